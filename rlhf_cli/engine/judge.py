"""Judges: what scores sampled responses, one float32 number per response.

PPO, `rlhf generate`, rft and online DPO all score through a `Judge`: a reward function
(`module:function`, called on the decoded texts) or a reward model (called on the token ids
of prompt + response, as the RM itself scores them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import UserError
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


def judge_keys(key_prefix: str) -> tuple[str, str]:
    """How errors name the two judge settings: `rft` -> (`rft.reward_fn`, `rft.reward_model`);
    a command line (`--`) -> (`--reward-fn`, `--reward-model`)."""
    if key_prefix.startswith("-"):
        return "--reward-fn", "--reward-model"
    return f"{key_prefix}.reward_fn", f"{key_prefix}.reward_model"


def checked(judge: Judge, where: str) -> Judge:
    """`judge`, refusing scores of the wrong count or that are not finite (a user error:
    a NaN reward would silently poison a ranking or a step)."""

    def run(rollout: Rollout, responses: list[str]) -> torch.Tensor:
        scores = judge(rollout, responses)
        if scores.shape != (len(responses),):
            raise UserError(f"the judge returned {tuple(scores.shape)} scores for {len(responses)} "
                            "responses", where=where)
        if not bool(torch.isfinite(scores).all()):
            raise UserError("the judge returned a NaN or infinite score", where=where)
        return scores

    return run


def make_judge(reward_fn: str | None, reward_model: str | None, *, key_prefix: str,
               model_section, tokenizer, policy=None) -> Judge | None:
    """The judge a sampling stage names (at most one of `reward_fn`, `reward_model`), or None.

    `model_section`: the policy's ModelSection (dtype, quantization, remote code for a
    separate RM). `policy`: the unwrapped peft policy; an RM trained with LoRA on its base
    becomes a frozen adapter on it (models/reward_judge.py) instead of a second model.
    """
    from ..models.reward_judge import reward_model_scorer

    fn_key, rm_key = judge_keys(key_prefix)
    if reward_fn and reward_model:
        raise UserError(f"give one judge, {rm_key} or {fn_key}, not both")
    if reward_fn:
        return checked(function_judge(reward_fn, fn_key), fn_key)
    if not reward_model:
        return None
    scorer = reward_model_scorer(reward_model, model_section, tokenizer, policy, where=rm_key)
    return checked(model_judge(scorer), rm_key)
