"""DPO and its family on preference pairs.

Δ = [logπ(y_w) − logπ_ref(y_w)] − [logπ(y_l) − logπ_ref(y_l)], loss e.g. −log σ(βΔ).
The reference is the same model with its LoRA adapter disabled (no second copy), a
frozen copy for full fine-tuning, or log-probs computed once before training
(`dpo.precompute_ref`). Chosen and rejected go through one concatenated forward, and
only response positions go through the output head.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch

from ...algorithms.preference import DPOFamilyLoss, preference_loss
from ...data.collate import pad_pairs
from ...data.loaders import load_pairs
from ...engine.final_model import save_final_model
from ...engine.loop import StageData, StageTask, Trainer
from ...engine.plots import plot_run
from ...engine.progress import say
from ...engine.run_dir import FINAL
from ...engine.runner import run_stage
from ...engine.scoring import policy_scorer
from ...models.lm_forward import sequence_logprobs
from ...models.policy import policy_model, tokenizer_for
from ...schema import Recipe
from .kto import kto_parts


class DPOObjective(torch.nn.Module):
    """Policy log-probs through the wrapper's forward; the reference on request."""

    def __init__(self, lm, frozen_reference=None):
        super().__init__()
        self.lm = lm
        self.frozen_reference = frozen_reference

    def forward(self, input_ids, attention_mask, labels, reference: bool = False):
        if not reference:
            return sequence_logprobs(self.lm, input_ids, attention_mask, labels)
        was_training = self.training
        self.eval()  # dropout off: the reference must be deterministic
        try:
            with torch.no_grad():
                if self.frozen_reference is not None:
                    return sequence_logprobs(self.frozen_reference, input_ids, attention_mask, labels)
                if not hasattr(self.lm, "disable_adapter"):
                    # Full fine-tuning with precomputed references: asked only before training.
                    return sequence_logprobs(self.lm, input_ids, attention_mask, labels)
                with self.lm.disable_adapter():
                    return sequence_logprobs(self.lm, input_ids, attention_mask, labels)
        finally:
            self.train(was_training)


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict:
    batch = pad_pairs(examples, pad_token_id)
    if examples and "ref_chosen_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor(
            [e["ref_chosen_logps"] for e in examples] + [e["ref_rejected_logps"] for e in examples],
            dtype=torch.float32)
    return batch


def _halves(t: torch.Tensor):
    half = t.shape[0] // 2
    return t[:half], t[half:]


def dpo_step_loss(model, batch, *, loss: DPOFamilyLoss):
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps, counts = model(*inputs)
    ref = None
    if loss.needs_reference:
        ref = batch["ref_logps"] if "ref_logps" in batch else model(*inputs, reference=True)[0]
    chosen, rejected = _halves(logps)
    chosen_len, rejected_len = _halves(counts)
    ref_chosen, ref_rejected = _halves(ref) if ref is not None else (None, None)
    losses, chosen_rewards, rejected_rewards = loss(
        chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=chosen_len,
        rejected_lengths=rejected_len, chosen_nll=-chosen / chosen_len.clamp(min=1))
    metrics = {
        "rewards/chosen": float(chosen_rewards.sum()),
        "rewards/rejected": float(rejected_rewards.sum()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).sum()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
        "logps/chosen": float(chosen.detach().sum()),
        "logps/rejected": float(rejected.detach().sum()),
    }
    return losses.sum(), metrics


@torch.no_grad()
def precompute_reference(objective: DPOObjective, examples, collate, backend, batch_size: int) -> None:
    """Reference log-probs once per pair, sharded over ranks and summed to all.

    A table of 2 floats a pair (16 MB per million), not a dict: each rank fills its own
    pairs, and the others' zeros leave them unchanged in the sum.
    """
    table = torch.zeros(len(examples), 2, dtype=torch.float64)
    mine = range(backend.rank, len(examples), backend.world_size)
    for start in range(0, len(mine), batch_size):
        indices = list(mine[start:start + batch_size])
        batch = collate([examples[i] for i in indices])
        args = [batch[k].to(backend.device) for k in ("input_ids", "attention_mask", "labels")]
        chosen, rejected = _halves(objective(*args, reference=True)[0].double().cpu())
        table[indices, 0], table[indices, 1] = chosen, rejected
    if backend.world_size > 1:
        table = backend.all_reduce_sum(table.to(backend.device)).cpu()
    for index, (chosen, rejected) in enumerate(table.tolist()):
        examples[index]["ref_chosen_logps"] = chosen
        examples[index]["ref_rejected_logps"] = rejected


def _pair_parts(recipe: Recipe, tokenizer, backend, loss: DPOFamilyLoss) -> StageData:
    """Pairs, collate, weight and loss of the paired losses, for the shared loop."""
    data = recipe.data
    return StageData(
        train_examples=load_pairs(recipe, tokenizer, data.train, "data.train", backend),
        eval_examples=(load_pairs(recipe, tokenizer, data.eval, "data.eval", backend)
                       if data.eval else None),
        collate=partial(collate_pairs, pad_token_id=tokenizer.pad_token_id),
        batch_weight=lambda batch: batch["input_ids"].shape[0] // 2,
        loss_fn=partial(dpo_step_loss, loss=loss),
        weight_name="pairs",
    )


def run_dpo(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    cfg, loss = recipe.dpo, preference_loss(recipe.dpo)
    tokenizer = tokenizer_for(recipe)
    parts = (_pair_parts if loss.paired else kto_parts)(recipe, tokenizer, backend, loss)
    lm = policy_model(recipe, announce=backend.is_main)
    frozen = None
    if recipe.model.lora is None and loss.needs_reference and not cfg.precompute_ref:
        frozen = copy.deepcopy(lm).requires_grad_(False).eval()
    task = StageTask(model=DPOObjective(lm, frozen), data=parts,
                     evaluate_extra=policy_scorer(recipe, tokenizer, backend), title=f"dpo ({cfg.loss_type})")
    trainer = Trainer(recipe, task, backend)
    if cfg.precompute_ref and loss.needs_reference:
        size = recipe.train.eval_batch_size or recipe.train.batch_size
        for examples in filter(None, (parts.train_examples, parts.eval_examples)):
            precompute_reference(backend.unwrap(trainer.model), examples, parts.collate, backend, size)
        say(backend, "reference log-probs precomputed")
    last_eval = run_stage(recipe, backend, run_dir, trainer.parts(), resume)
    final = save_final_model(backend, trainer.model, lambda m: m.lm, tokenizer, run_dir / FINAL)
    if backend.is_main:
        plot_run(run_dir)
        say(backend, f"saved {final}")
    return {k: v for k, v in last_eval.items() if k not in ("step", "split")}
