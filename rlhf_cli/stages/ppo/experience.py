"""From a rollout to training targets: the experience, then its advantages.

Old log-probs, reference log-probs and values (with a critic) are computed once per
rollout, without grad, in eval mode, at the rollout temperature. Advantages come from
`ppo.advantage` (algorithms/ppo.py `estimate_advantages`); the whitening of gae and
REINFORCE++ uses the masked mean/std over the whole rollout batch of all processes, and the
groups of grpo/rloo are the `ppo.samples_per_prompt` consecutive rows of one prompt, which
the rollout keeps on one process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...algorithms.advantages import informative_groups
from ...algorithms.kl import kl_estimate, kl_k1
from ...algorithms.overlong import soft_overlong_penalty
from ...algorithms.ppo import estimate_advantages
from ...engine.rollout import Rollout
from ...schema import PPOSection


@dataclass
class Experience:
    """B sampled responses (rows) with everything the updates need; R: the response width."""

    input_ids: torch.Tensor  # [B, P + R] prompt (left-padded to P) | response (right-padded)
    attention_mask: torch.Tensor  # [B, P + R]
    tokens: torch.Tensor  # [B, R] the response tokens (pad after the end)
    response_mask: torch.Tensor  # [B, R] float: 1 on response tokens (EOS included)
    prompt_width: int  # P
    old_logprobs: torch.Tensor  # [B, R] log π_old, the policy that sampled
    ref_logprobs: torch.Tensor  # [B, R] log π_ref
    old_values: torch.Tensor | None  # [B, R] the critic's values (masked); None without a critic
    kl: torch.Tensor  # [B, R] per-token KL estimate (`ppo.kl_estimator`), masked
    rewards: torch.Tensor  # [B] the scores shaped for training (normalised, EOS penalty, clipped)
    kl_per_response: torch.Tensor  # [B] Σ_t (log π_old − log π_ref), for the logs
    advantages: torch.Tensor | None = None  # [B, R] from `with_advantages`
    returns: torch.Tensor | None = None  # [B, R] the critic's targets (with a critic)

    def select(self, index: torch.Tensor) -> Experience:
        """The rows `index` (a minibatch or micro-batch)."""
        picked = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Experience(**{k: v[index] if isinstance(v, torch.Tensor) else v for k, v in picked.items()})


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, ppo: PPOSection,
                 stats: dict | None, *, lengths: torch.Tensor | None = None, running=None) -> torch.Tensor:
    """Normalise with the RM's stored mean/std, penalise missing EOS (and, with `ppo.overlong:
    penalty`, add DAPO's soft length penalty of the response `lengths`), centre/scale by the
    running moments (`running`: reward_scaling.RunningRewards, PPO-max), clip to ±reward_clip."""
    scores = raw.clone()
    if ppo.normalize_reward and stats:
        scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
    scores = scores + (~ended).float() * ppo.no_eos_penalty
    if ppo.overlong == "penalty":  # DAPO
        lengths = lengths.to(scores.device)
        scores = scores + soft_overlong_penalty(lengths, ppo.max_new_tokens, ppo.overlong_buffer)
    if running is not None:
        scores = running(scores)
    return scores.clamp(-ppo.reward_clip, ppo.reward_clip)


@torch.no_grad()
def old_policy_outputs(arrangement, rollout: Rollout, reference: bool = True):
    """(log π_old, log π_ref, values). `reference=False` (ppo.kl_coef 0): no reference forward;
    log π_ref is log π_old itself, so that every KL is 0."""
    was_training = arrangement.training
    arrangement.eval()
    try:
        logp, values, _ = arrangement(rollout.input_ids, rollout.attention_mask, rollout.prompt_width,
                                      rollout.tokens, with_entropy=False)
        ref = logp if not reference else arrangement.reference_logprobs(
            rollout.input_ids, rollout.attention_mask, rollout.prompt_width, rollout.tokens)
    finally:
        arrangement.train(was_training)
    return logp, ref, values


def summed_over_processes(backend):
    """The `reduce` of the masked statistics (whitening, explained variance): each local
    moment summed over all processes."""
    return lambda moments: tuple(backend.all_reduce_sum(m) for m in moments)


def make_experience(arrangement, rollout: Rollout, raw_scores: torch.Tensor, ppo: PPOSection,
                    reward_stats: dict | None, running=None) -> Experience:
    """The rollout, its old/reference log-probs and values, KL and shaped rewards (no advantages
    yet); `running`: see `shape_scores`. No reference forward at kl_coef 0."""
    old_logp, ref_logp, values = old_policy_outputs(arrangement, rollout, reference=ppo.kl_coef != 0)
    mask = rollout.response_mask
    if values is not None:
        values = values * mask
    return Experience(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, tokens=rollout.tokens,
        response_mask=mask, prompt_width=rollout.prompt_width, old_logprobs=old_logp,
        ref_logprobs=ref_logp, old_values=values, kl=kl_estimate(old_logp, ref_logp, ppo.kl_estimator) * mask,
        rewards=shape_scores(raw_scores, rollout.ended.to(raw_scores.device), ppo, reward_stats,
                             lengths=rollout.response_mask.sum(dim=1), running=running),
        kl_per_response=(kl_k1(old_logp, ref_logp) * mask).sum(dim=1))


def with_advantages(experience: Experience, ppo: PPOSection, kl_coef: float, backend) -> Experience:
    """The experience with advantages and returns (`ppo.advantage`; KL penalty `kl_coef`)."""
    advantages, returns = estimate_advantages(
        ppo.advantage, experience.rewards, experience.kl, experience.response_mask, kl_coef,
        values=experience.old_values, gamma=ppo.gamma, lam=ppo.lam, group_size=ppo.samples_per_prompt,
        reduce=summed_over_processes(backend), scale_rewards=ppo.scale_rewards)
    if ppo.advantage_clip is not None:  # PPO-max: |A| <= c after whitening (0 off the mask stays 0)
        advantages = advantages.clamp(-ppo.advantage_clip, ppo.advantage_clip)
    return dataclasses.replace(experience, advantages=advantages, returns=returns)


def zero_std_share(scores: torch.Tensor, group_size: int) -> float:
    """Share of this batch's prompts whose samples all scored the same (no group signal)."""
    return 1.0 - float(informative_groups(scores.float(), group_size).float().mean())
