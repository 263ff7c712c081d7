"""Offline and online DPO's objective: the policy's summed response log-probs and, on
request, the reference's; and the step loss of a batch of pairs (chosen rows, then rejected)."""

from __future__ import annotations

import copy

import torch

from ...algorithms.preference import DPOFamilyLoss
from ...data.collate import pad_pairs
from ...models.lm_forward import sequence_logprobs
from ...models.policy import policy_model
from ...schema import Recipe


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


def halves(t: torch.Tensor):
    half = t.shape[0] // 2
    return t[:half], t[half:]


def dpo_step_loss(model, batch, *, loss: DPOFamilyLoss):
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps, counts = model(*inputs)
    ref = None
    if loss.needs_reference:
        ref = batch["ref_logps"] if "ref_logps" in batch else model(*inputs, reference=True)[0]
    chosen, rejected = halves(logps)
    chosen_len, rejected_len = halves(counts)
    ref_chosen, ref_rejected = halves(ref) if ref is not None else (None, None)
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


def dpo_objective(recipe: Recipe, loss: DPOFamilyLoss, backend) -> DPOObjective:
    """The policy (fresh adapter or full model) and, for full fine-tuning with a loss that reads
    the reference live, a frozen copy of it as the reference."""
    lm = policy_model(recipe, announce=backend.is_main)
    frozen = None
    if recipe.model.lora is None and loss.needs_reference and not recipe.dpo.precompute_ref:
        frozen = copy.deepcopy(lm).requires_grad_(False).eval()
    return DPOObjective(lm, frozen)
