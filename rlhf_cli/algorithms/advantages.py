"""Critic-free advantage estimators: GRPO, RLOO, REINFORCE++.

Sequence-level estimators (GRPO, RLOO) take one score per sample, laid out prompt by prompt:
``scores[i*G:(i+1)*G]`` are the G samples of prompt i. They return one advantage per sample
[N*G]; broadcast it over the response tokens with ``adv[:, None] * response_mask``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_cli.algorithms.masked import Moments, masked_moments, masked_whiten, mean_var_from_moments


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N*G], got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group-relative advantages need group_size >= 2, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.float().view(-1, group_size)


def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """GRPO: A_i = (r_i − mean_g) / (std_g + eps) within each group of ``group_size`` samples.

    Shapes: scores [N*G] -> [N*G]. std is the unbiased (n − 1) group std, as in the GRPO
    paper/trl. ``scale_by_std=False`` gives r_i − mean_g (Dr. GRPO). A group whose rewards are
    all equal gets advantage 0.
    """
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO: A_i = r_i − mean_{j≠i} r_j = (G/(G−1))·(r_i − mean_g).

    Shapes: scores [N*G] -> [N*G]; the baseline of each sample is the mean of the G − 1 other
    samples of the same prompt.
    """
    g = _groups(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


# The group-relative `ppo.advantage` estimators -> the baseline each puts in place of the score;
# the catalog's `group_relative` estimators are exactly these (tests/test_algorithms_registries.py).
GROUP_BASELINES = {"grpo": grpo_advantages, "rloo": rloo_advantages}


# DAPO / Dr. GRPO ------------------------------------------------------------------------------
# `ppo.scale_rewards: auto`: what each group-relative estimator divides by when not told.
AUTO_SCALING = {"grpo": "group", "rloo": "none"}


def batch_std(scores: Tensor, reduce=None) -> Tensor:
    """Unbiased std of the scores [N] of the whole batch; ``reduce`` sums the moments over
    processes (as for whitening), so every process divides by the std of all of them."""
    moments = masked_moments(scores, torch.ones_like(scores))
    return mean_var_from_moments(reduce(moments) if reduce else moments)[1].sqrt().float()


def group_advantages(kind: str, scores: Tensor, group_size: int, scale: str = "auto",
                     reduce=None, eps: float = 1e-6) -> Tensor:
    """A group-relative estimator's advantages [N*G] (`ppo.scale_rewards`): the score minus its
    group's baseline (grpo: the group mean; rloo: the mean of the others), divided by the
    group's std (``group``), the batch's std (``batch``, trl's scale_rewards="batch") or
    nothing (``none``, Dr. GRPO); ``auto`` is the estimator's own (AUTO_SCALING). eps = 1e-6.
    """
    scale = AUTO_SCALING[kind] if scale == "auto" else scale
    if kind == "grpo":  # the same operations, in the same order, as grpo_advantages
        centred = grpo_advantages(scores, group_size, eps, scale_by_std=False)
    else:
        centred = GROUP_BASELINES[kind](scores, group_size)
    if scale == "group":
        std = _groups(scores, group_size).std(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (batch_std(scores, reduce) + eps)
    if scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}")
    return centred


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """Bool [N]: the groups of ``group_size`` consecutive scores that are not all equal (DAPO's
    dynamic sampling keeps only these: an all-equal group has advantage 0, no signal)."""
    groups = _groups(scores, group_size)
    return groups.max(dim=1).values != groups.min(dim=1).values


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + γ·G_{t+1} per row, restarting at 0 after the last masked-in token.

    Shapes: rewards [B, T], mask [B, T] (0/1, right- or left-padded) -> [B, T], 0 where mask = 0.
    """
    m = (mask != 0).to(rewards.device)
    r = rewards.detach().float().masked_fill(~m, 0)
    running = torch.zeros_like(r[:, 0])
    out = []
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * m[:, t]
        out.append(running)
    return torch.stack(out[::-1], dim=1)


def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, gamma: float = 1.0, stats: Moments | None = None
) -> Tensor:
    """REINFORCE++: discounted returns (no critic), then whitened over the batch with the mask.

    Shapes: token_rewards [B, T] (score at the last token, −β·KL on each token, see
    ``token_rewards``), mask [B, T] -> advantages [B, T], 0 where mask = 0.
    For whitening over all processes: ``G = discounted_returns(...)``, all-reduce
    ``masked_moments(G, mask)`` and pass it as ``stats`` (which must be computed from the
    same returns); the default whitens over this batch only.
    """
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask, stats=stats)
