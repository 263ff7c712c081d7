"""KTO (Ethayarajh et al., 2024): `rlhf dpo` with `dpo.loss_type: kto`, on unpaired completions.

Each example is one completion labelled desirable or undesirable. With r = logπ − logπ_ref
(summed over the completion), the loss is λ_D(1 − σ(β(r − z))) or λ_U(1 − σ(β(z − r))),
where the reference point z is the policy's KL to the reference, estimated on mismatched
completions: within each micro-batch, prompt i is followed by completion i+1. z is
detached, clamped at 0 and averaged over all processes.

Data: rows with `prompt`/`completion`/`label`, or preference pairs, which become two
unpaired examples each (chosen: desirable, rejected: undesirable).
"""

from __future__ import annotations

from functools import partial

import torch

from ...algorithms.preference import KTOLoss
from ...data.collate import pad_batch
from ...data.loaders import load_unpaired
from ...data.sft import IGNORE_INDEX
from ...engine.loop import StageData
from ...errors import UserError
from ...schema import Recipe


def prompt_length(labels: list[int]) -> int:
    """Leading positions without loss: the prompt (the completion is labelled to the end)."""
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return index
    return len(labels)


def mismatched(examples: list[dict], max_length: int) -> list[dict]:
    """Prompt i followed by completion i+1 (cyclically), cut to `max_length`, for the KL estimate."""
    rows = []
    for i, example in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        cut, other_cut = prompt_length(example["labels"]), prompt_length(other["labels"])
        prompt = example["input_ids"][:cut]
        completion = other["input_ids"][other_cut:][:max(max_length - len(prompt), 1)]
        rows.append({"input_ids": prompt + completion,
                     "labels": [IGNORE_INDEX] * len(prompt) + completion})
    return rows


def collate_unpaired(examples: list[dict], pad_token_id: int, max_length: int) -> dict:
    """B examples then their B mismatched rows, padded together: [2B, T], plus `desirable` [B]."""
    batch = pad_batch(list(examples) + mismatched(examples, max_length), pad_token_id)
    batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


def global_mean(value: torch.Tensor, count: int) -> torch.Tensor:
    """Mean over every process's micro-batch (each rank calls this once per micro-batch)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    packed = torch.stack([value.detach().double() * count, torch.tensor(float(count), dtype=torch.float64,
                                                                         device=value.device)])
    torch.distributed.all_reduce(packed)
    return (packed[0] / packed[1]).to(value.dtype)


def kto_step_loss(model, batch, *, loss: KTOLoss):
    half = batch["input_ids"].shape[0] // 2
    main = [batch[k][:half] for k in ("input_ids", "attention_mask", "labels")]
    kl_rows = [batch[k][half:] for k in ("input_ids", "attention_mask", "labels")]
    logps, _ = model(*main)
    with torch.no_grad():
        kl_logps, _ = model(*kl_rows)
    ref = model(batch["input_ids"], batch["attention_mask"], batch["labels"], reference=True)[0]
    ref_logps, ref_kl_logps = ref[:half], ref[half:]
    z = global_mean((kl_logps - ref_kl_logps).mean(), half).clamp(min=0)
    desirable = batch["desirable"]
    losses = loss(logps, ref_logps, desirable, z)
    rewards = loss.beta * (logps.detach() - ref_logps)
    metrics = {
        "kl": float(z) * half,  # divided by the examples: the mean z over micro-batches
        "_desirable": float(desirable.sum()),
        "_undesirable": float((~desirable).sum()),
        "_rewards_desirable": float(rewards[desirable].sum()),
        "_rewards_undesirable": float(rewards[~desirable].sum()),
        "_logps_desirable": float(logps.detach()[desirable].sum()),
        "_logps_undesirable": float(logps.detach()[~desirable].sum()),
    }
    return losses.sum(), metrics


def finish_kto_metrics(row: dict) -> dict:
    """Means over desirable and undesirable examples from the summed parts (names as for DPO)."""
    row = dict(row)
    counts = {side: row.pop(f"_{side}", 0.0) for side in ("desirable", "undesirable")}
    for side, name in (("desirable", "chosen"), ("undesirable", "rejected")):
        for what in ("rewards", "logps"):
            total = row.pop(f"_{what}_{side}", None)
            if total is not None and counts[side] > 0:
                row[f"{what}/{name}"] = total / counts[side]
    if "rewards/chosen" in row and "rewards/rejected" in row:
        row["rewards/margins"] = row["rewards/chosen"] - row["rewards/rejected"]
    return row


def check_kto(recipe: Recipe) -> None:
    if recipe.dpo.precompute_ref:
        raise UserError("dpo.precompute_ref does not apply to kto: the KL estimate pairs prompts with "
                        "other completions of each batch; set it to false", where="dpo.precompute_ref")
    if recipe.train.batch_size < 2:
        raise UserError("kto needs train.batch_size >= 2: its KL estimate pairs each prompt with "
                        "another example's completion", where="train.batch_size")


def kto_parts(recipe: Recipe, tokenizer, backend, loss: KTOLoss) -> StageData:
    """Train/eval examples, collate, weight, loss and metric finishing for the shared loop."""
    check_kto(recipe)
    data = recipe.data
    return StageData(
        train_examples=load_unpaired(recipe, tokenizer, data.train, "data.train", backend),
        eval_examples=(load_unpaired(recipe, tokenizer, data.eval, "data.eval", backend)
                       if data.eval else None),
        collate=partial(collate_unpaired, pad_token_id=tokenizer.pad_token_id,
                        max_length=data.max_length),
        batch_weight=lambda batch: batch["input_ids"].shape[0] // 2,
        loss_fn=partial(kto_step_loss, loss=loss),
        finish_metrics=finish_kto_metrics,
        weight_name="examples",
    )
