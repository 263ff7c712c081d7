"""PPO maths: per-token rewards, GAE, clipped policy/value losses, entropy, explained variance.

Shapes: B sequences × T response positions; ``mask`` / ``response_mask`` [B, T] is 1 on the
response tokens that count (padding and anything after the first EOS are 0). Masks may be
right-padded or start late (a prompt prefix at 0); a row's response is its contiguous run of
1s. The KL estimators, KL controllers and critic-free advantages are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_cli.algorithms.advantages import (
    discounted_returns,
    group_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_cli.algorithms.catalog import ADVANTAGE_ESTIMATORS
from rlhf_cli.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
)
from rlhf_cli.algorithms.masked import (
    Moments,
    last_token_index,
    masked_mean,
    masked_moments,
    masked_var,
    masked_whiten,
    mean_var_from_moments,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "discounted_returns",
    "entropy_from_logits",
    "estimate_advantages",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "last_token_index",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_rewards",
    "value_loss",
]

_LOG_RATIO_CLAMP = 20.0


def token_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """r_t = −β·kl_t on every response token, plus the sequence score at its LAST response token.

    Shapes: scores [B], kl [B, T] (per-token estimate, e.g. ``kl_k1``), response_mask [B, T],
    kl_coef β a float or scalar tensor -> rewards [B, T] (float, detached), 0 where mask = 0.
    The last token is found per row from the mask (rows may have different lengths). A row
    with an EMPTY response (mask all 0) gets all-zero rewards: its score is dropped, since there
    is no token to credit it to.
    """
    m = response_mask != 0
    rewards = (-kl_coef * kl.detach().float()).masked_fill(~m, 0)
    last = last_token_index(m)
    has_tokens = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    bonus = torch.where(has_tokens, scores.detach().float(), torch.zeros_like(rewards[:, 0]))
    rewards[rows, last.clamp(min=0)] += bonus
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation. Returns ``(advantages [B, T], returns [B, T])``, detached.

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns_t = A_t + V_t.
    Rewards and values where mask = 0 are treated as 0, so the value after a row's last
    response token is V_{T_end+1} = 0 and nothing flows back from padding; both outputs are
    0 where mask = 0. Shapes: rewards, values, mask [B, T].
    """
    m = mask != 0
    r = rewards.detach().float().masked_fill(~m, 0)
    v = values.detach().float().masked_fill(~m, 0)
    advantage = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    out = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        advantage = (delta + gamma * lam * advantage) * m[:, t]
        next_value = v[:, t]
        out.append(advantage)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, (advantages + v).masked_fill(~m, 0)


def estimate_advantages(
    kind: str,
    scores: Tensor,
    kl: Tensor,
    mask: Tensor,
    kl_coef: float,
    *,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    reduce: Callable[[Moments], Moments] | None = None,
    scale_rewards: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Advantages [B, T] and returns [B, T] of one rollout batch, by estimator ``kind``.

    Every estimator uses the per-token rewards of :func:`token_rewards`: −β·kl_t on each
    response token, the (possibly baselined) score added at the last one.
    - ``gae``: GAE with the critic's ``values`` [B, T]; advantages whitened over the batch.
    - ``reinforce_pp`` (REINFORCE++): A_t = discounted return G_t, whitened over the batch.
    - ``grpo`` / ``rloo``: each score first replaced by its group-relative advantage over
      consecutive groups of ``group_size`` rows (the samples of one prompt), then
      A_t = G_t; not whitened (the group baseline already centres it). With β = 0 and γ = 1
      every token of sample i carries exactly the sequence advantage A_i.
    ``scale_rewards``: what the group-relative score is divided by (advantages.py
    ``group_advantages``; ``auto``: grpo by its group's std, rloo by nothing).
    returns: GAE's A + V (the critic's target) or G_t. ``reduce`` sums the whitening moments
    ``(Σ m x, Σ m x², Σ m)`` over processes (identity for one process). Shapes: scores [B];
    kl, mask [B, T].
    """
    if kind not in ADVANTAGE_ESTIMATORS:
        names = tuple(ADVANTAGE_ESTIMATORS)
        raise ValueError(f"unknown advantage estimator {kind!r}; expected one of {names}")
    if ADVANTAGE_ESTIMATORS[kind].group_relative:
        scores = group_advantages(kind, scores, group_size, scale_rewards, reduce)
    rewards = token_rewards(scores, kl, mask, kl_coef)
    if kind == "gae":
        if values is None:
            raise ValueError("gae needs the critic's values")
        advantages, returns = gae(rewards, values, mask, gamma, lam)
    else:
        advantages = returns = discounted_returns(rewards, mask, gamma)
    if not ADVANTAGE_ESTIMATORS[kind].group_relative:  # a group baseline already centres them
        moments = masked_moments(advantages, mask)
        advantages = masked_whiten(advantages, mask, stats=reduce(moments) if reduce else moments)
    return advantages, returns


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    dual_clip: float | None = None,
    clip_range_high: float | None = None,
    aggregate: Callable[[Tensor, Tensor], Tensor] = masked_mean,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, token-mean over the mask. Returns ``(loss scalar, stats)``.

    ratio = exp(clamp(logπ − logπ_old, −20, 20));  L = max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε)).
    Dual clip (``dual_clip`` = c > 1): where A < 0, L = min(L, −c·A).
    DAPO's clip-higher: ``clip_range_high`` ε_high (default ε) bounds the ratio at 1 + ε_high,
    ``clip_range`` at 1 − ε. ``aggregate(losses, mask)``: how the per-token losses become the
    loss (algorithms/aggregation.py; default the token-mean).
    Shapes: logp, old_logp, advantages, mask [B, T]. stats (detached scalars):
    ``clip_frac`` share of tokens where the clipped term was the larger one (clipping active),
    ``dual_clip_frac`` share where the dual clip bound applied (0 without it),
    ``approx_kl`` = mean ½(logπ − logπ_old)² (the k2 estimator), ``ratio_mean``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_range if clip_range_high is None else clip_range_high
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    losses = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(losses, dtype=torch.bool)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (losses > bound)
        losses = torch.where(dual_active, bound, losses)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "dual_clip_frac": masked_mean(dual_active.float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return aggregate(losses, mask), stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float | None = 0.2,
    aggregate: Callable[[Tensor, Tensor], Tensor] = masked_mean,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²), token-mean over mask.

    Shapes: values, old_values, returns, mask [B, T]. ``clip_range_value=None`` gives the
    plain 0.5·(V − R)². ``aggregate`` as in :func:`policy_loss`. stats: ``vf_clip_frac`` =
    share of tokens where the clipped term was the larger one.
    """
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        clipped = unclipped
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
        clipped = (v_clipped - returns) ** 2
    losses = 0.5 * torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean((clipped > unclipped).float(), mask)}
    return aggregate(losses, mask), stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = −Σ_v p_v log p_v over the last dim, p = softmax(logits). Shapes: [..., V] -> [...].

    ``-inf`` logits (e.g. top-k filtered) contribute 0, with finite gradients.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    log_p = torch.where(torch.isfinite(log_p), log_p, torch.zeros_like(log_p))
    return -(p * log_p).sum(dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor,
                       reduce: Callable[[Moments], Moments] | None = None) -> Tensor:
    """1 − Var[R − V] / Var[R] over masked tokens (scalar, detached); nan if Var[R] = 0.

    1 = perfect value predictions, 0 = no better than a constant, < 0 = worse.
    Shapes: values, returns, mask [B, T]. ``reduce`` sums moments over processes (as for
    whitening), so that every process reports the value of the whole batch of all processes.
    """
    values, returns = values.detach().float(), returns.detach().float()
    if reduce is None:
        var_returns = masked_var(returns, mask)
        var_resid = masked_var(returns - values, mask)
    else:
        var_returns = mean_var_from_moments(reduce(masked_moments(returns, mask)))[1]
        var_resid = mean_var_from_moments(reduce(masked_moments(returns - values, mask)))[1]
        var_returns, var_resid = var_returns.float(), var_resid.float()
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1 - var_resid / var_returns.clamp(min=1e-30), nan)
