"""The evaluation loss of a loss-based stage (loop.py): the held-out examples' summed loss
and metrics over their summed weight, over all processes."""

from __future__ import annotations

import torch

from .reduce import global_sums
from .train_step import add_metrics, to_device


@torch.no_grad()
def evaluate_loss(model, data, batch_size: int, backend) -> dict[str, float]:
    model.eval()
    examples = data.eval_examples
    shard = examples[backend.rank::backend.world_size]
    # Every rank runs the same number of forwards: ZeRO-3 gathers weights
    # collectively, so a rank with one batch fewer would leave the others waiting.
    per_rank = -(-len(examples) // backend.world_size)
    loss_sum, weight, metric_sums = 0.0, 0.0, {}
    for start in range(0, per_rank, batch_size):
        chunk = shard[start:start + batch_size]
        batch = data.collate(chunk or examples[:1])
        with backend.autocast():
            loss, metrics = data.loss_fn(model, to_device(batch, backend.device))
        if not chunk:
            continue  # a padding forward: its numbers are not counted
        loss_sum += float(loss)
        weight += float(data.batch_weight(batch))
        add_metrics(metric_sums, metrics)
    totals = global_sums(backend, {**metric_sums, "<loss>": loss_sum, "<weight>": weight})
    weight = max(totals.pop("<weight>"), 1.0)
    row = {"loss": totals.pop("<loss>") / weight}
    row.update({k: v / weight for k, v in sorted(totals.items())})
    if data.finish_metrics is not None:
        row = data.finish_metrics(row)
    return row
