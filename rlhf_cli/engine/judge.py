"""Judges: what scores sampled responses, one float32 number per response.

PPO, `rlhf generate`, rft and online DPO all score through a `Judge`: a reward function
(`module:function`, called on the decoded texts) or a reward model (called on the token ids
of prompt + response, as the RM itself scores them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..rewards import load_reward_fn
from .rollout import Rollout

# (input_ids [B, T], attention_mask [B, T]) -> raw scores [B]
SequenceScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Judge(Protocol):
    def __call__(self, rollout: Rollout, responses: list[str]) -> torch.Tensor:
        """Scores [B] (float32, on the rollout's device) of the rollout's decoded `responses`."""


def function_judge(spec: str, key: str) -> Judge:
    """A reward function; `load_reward_fn` checks its count and finiteness (errors name `key`)."""
    reward_fn = load_reward_fn(spec, key=key)

    def judge(rollout: Rollout, responses: list[str]) -> torch.Tensor:
        values = reward_fn(rollout.prompts, responses)
        return torch.tensor(values, dtype=torch.float32, device=rollout.input_ids.device)

    return judge


def model_judge(score: SequenceScorer) -> Judge:
    """A reward model, given as the function that scores token ids."""

    def judge(rollout: Rollout, responses: list[str]) -> torch.Tensor:
        return score(rollout.input_ids, rollout.attention_mask).float()

    return judge
