"""DAPO's overlong filtering (`ppo.overlong: mask`): a response cut at ppo.max_new_tokens (no
EOS) gets zero loss weight; its truncation says nothing about whether its reasoning was right.
(The soft length penalty, `ppo.overlong: penalty`, is a reward: experience.py shape_scores.)"""

from __future__ import annotations

import dataclasses

import torch

from .experience import Experience


def overlong_masked(experience: Experience, ended: torch.Tensor, ppo) -> Experience:
    """The experience with the truncated responses' tokens masked out (as it is without `mask`).

    Masked before the advantages: they neither count in whitening nor weigh in the loss (the
    aggregations of algorithms/aggregation.py ignore masked tokens; an empty row counts as a
    row only in seq-mean-token-sum-norm, at loss 0)."""
    if ppo.overlong != "mask":
        return experience
    ended = ended.to(experience.response_mask.device)
    return dataclasses.replace(experience, response_mask=experience.response_mask * ended[:, None])
