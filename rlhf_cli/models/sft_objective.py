"""The SFT loss on a causal LM: next-token cross-entropy on the response tokens, summed.

Shared by `rlhf sft` and the rounds of `rlhf rft` (its fine-tuning on kept samples is SFT);
the engine divides the sum by the global batch's trained tokens, so accumulation is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lm_forward import selected_logits, shifted_targets


class SFTObjective(torch.nn.Module):
    """Wraps the LM so that DDP/DeepSpeed see one forward that returns the summed loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels):
        targets, mask = shifted_targets(input_ids, labels)
        logits = selected_logits(self.lm, input_ids, attention_mask, mask)
        return F.cross_entropy(logits.float(), targets[mask], reduction="sum")


def trained_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def sft_loss(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"]), {}
