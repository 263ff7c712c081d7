"""One optimizer step of a loss-based stage (loop.py), exact under accumulation and data
parallelism: the summed loss of every micro-batch, divided by the global batch's weight."""

from __future__ import annotations

import math

import torch

from .reduce import global_sums


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def add_metrics(sums: dict[str, float], metrics: dict) -> None:
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + float(value)


def train_step(model, data, micro_indices: list, backend, scheduler) -> dict[str, float]:
    """The step's row: loss and metrics over the global batch, lr, grad_norm; `_weight` (the
    global batch's weight) and `_bad` (NaN/inf: the step was skipped) for the loop."""
    micro = [data.collate([data.train_examples[i] for i in idx]) for idx in micro_indices]
    global_weight = global_sums(backend, {"w": sum(float(data.batch_weight(b)) for b in micro)})["w"]
    model.train()
    loss_sum, metric_sums = 0.0, {}
    for i, batch in enumerate(micro):
        with backend.accumulating(i < len(micro) - 1), backend.autocast():
            loss, metrics = data.loss_fn(model, to_device(batch, backend.device))
            # DDP/DeepSpeed average gradients over ranks; scale so the result is the
            # sum over the global batch divided by its weight.
            backend.backward(loss * backend.world_size / global_weight)
        loss_sum += float(loss.detach())
        add_metrics(metric_sums, metrics)
    # Summed before the optimizer step: every rank must agree on skipping it.
    totals = global_sums(backend, {**metric_sums, "<loss>": loss_sum})
    bad_loss = not math.isfinite(totals["<loss>"])
    if bad_loss and backend.can_skip_steps:
        backend.skip_step()
        grad_norm = float("nan")
    else:
        grad_norm = backend.optimizer_step()
    lr = scheduler.get_last_lr()[0]
    # A skipped step still advances the schedule: lr stays a function of the step number,
    # as the data position does.
    scheduler.step()
    row = {"loss": totals.pop("<loss>") / global_weight, "lr": lr, "grad_norm": grad_norm}
    row.update({k: v / global_weight for k, v in sorted(totals.items())})
    row["_weight"] = global_weight
    row["_bad"] = bad_loss or backend.skipped_step
    return row
