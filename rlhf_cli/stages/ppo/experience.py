"""From a rollout to training targets: scores, per-token KL rewards, advantages.

Old log-probs, reference log-probs and values (with a critic) are computed once per
rollout, without grad, in eval mode, at the rollout temperature. Advantages come from
`ppo.advantage` (algorithms/ppo.py `estimate_advantages`); the whitening of gae and
REINFORCE++ uses the masked mean/std over the whole rollout batch of all processes, and the
groups of grpo/rloo are the `ppo.samples_per_prompt` consecutive rows of one prompt, which
the rollout keeps on one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...algorithms.kl import kl_estimate, kl_k1
from ...algorithms.ppo import estimate_advantages
from ...schema import PPOSection
from .rollout import Rollout


@dataclass
class Experience:
    rollout: Rollout
    old_logprobs: torch.Tensor  # [B, R]
    ref_logprobs: torch.Tensor  # [B, R]
    old_values: torch.Tensor | None  # [B, R]; None without a critic
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]
    scores: torch.Tensor  # [B] raw scores (before normalisation and penalties)
    kl_per_response: torch.Tensor  # [B] Σ_t (log π_old − log π_ref)


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, ppo: PPOSection,
                 stats: dict | None) -> torch.Tensor:
    """Normalise with the RM's stored mean/std, penalise missing EOS, clip to ±reward_clip."""
    scores = raw.clone()
    if ppo.normalize_reward and stats:
        scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
    scores = scores + (~ended).float() * ppo.no_eos_penalty
    return scores.clamp(-ppo.reward_clip, ppo.reward_clip)


@torch.no_grad()
def old_policy_outputs(arrangement, rollout: Rollout):
    was_training = arrangement.training
    arrangement.eval()
    try:
        logp, values, _ = arrangement(rollout.input_ids, rollout.attention_mask, rollout.prompt_width,
                                      rollout.tokens, with_entropy=False)
        ref = arrangement.reference_logprobs(rollout.input_ids, rollout.attention_mask,
                                             rollout.prompt_width, rollout.tokens)
    finally:
        arrangement.train(was_training)
    return logp, ref, values


def summed_over_processes(backend):
    """The `reduce` of the masked statistics (whitening, explained variance): each local
    moment summed over all processes."""
    return lambda moments: tuple(backend.all_reduce_sum(m) for m in moments)


def build_experience(arrangement, rollout: Rollout, raw_scores: torch.Tensor, ppo: PPOSection,
                     kl_coef: float, backend, reward_stats: dict | None) -> Experience:
    old_logp, ref_logp, values = old_policy_outputs(arrangement, rollout)
    mask = rollout.response_mask
    if values is not None:
        values = values * mask
    kl = kl_estimate(old_logp, ref_logp, ppo.kl_estimator) * mask
    scores = shape_scores(raw_scores, rollout.ended.to(raw_scores.device), ppo, reward_stats)
    advantages, returns = estimate_advantages(
        ppo.advantage, scores, kl, mask, kl_coef, values=values, gamma=ppo.gamma, lam=ppo.lam,
        group_size=ppo.samples_per_prompt,
        reduce=summed_over_processes(backend))
    kl_per_response = (kl_k1(old_logp, ref_logp) * mask).sum(dim=1)
    return Experience(rollout, old_logp, ref_logp, values, advantages, returns, raw_scores,
                      kl_per_response)


def zero_std_share(scores: torch.Tensor, group_size: int) -> float:
    """Share of this batch's prompts whose samples all scored the same (no group signal)."""
    groups = scores.float().view(-1, group_size)
    return float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean())
