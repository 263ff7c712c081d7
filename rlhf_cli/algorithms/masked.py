"""Masked reductions and whitening.

A mask is a tensor of 0/1 (bool, int or float) broadcastable to ``x``; positions where it is 0
are *ignored*, whatever ``x`` holds there (``nan``/``inf`` padding included): they are filled
with 0 before any arithmetic, never multiplied.
"""

from __future__ import annotations

import torch
from torch import Tensor

Moments = tuple[Tensor, Tensor, Tensor]


def _as_bool(mask: Tensor, x: Tensor) -> Tensor:
    return torch.broadcast_to(mask.to(device=x.device) != 0, x.shape)


def _float(x: Tensor) -> Tensor:
    """``x`` in at least float32 (bf16/fp16 statistics lose too much precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def last_token_index(mask: Tensor) -> Tensor:
    """Index [B] (long) of the last position with mask ≠ 0 in each row of ``mask`` [B, T], for
    any padding side (right, left, or a prompt prefix before a response).

    A row with no such position (all padding) yields −1: it has no last token, and no padding
    position is passed off as one; each caller says what such a row gets (``token_rewards``
    drops its score, the reward heads give NaN). Never found from pad-id equality: the pad id
    may equal the EOS id, and the EOS is the token a reward model scores.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, positions, torch.full_like(positions, -1)).max(dim=-1).values


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ_i x_i over positions with mask_i = 1.

    Shapes: x [...], mask broadcastable to x. ``dim=None`` reduces everything to a scalar,
    otherwise that dimension is reduced (the rest keep their shape).
    """
    filled = x.masked_fill(~_as_bool(mask, x), 0)
    return filled.sum() if dim is None else filled.sum(dim)


def masked_count(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of positions with mask = 1 (as x's float dtype), reduced like :func:`masked_sum`."""
    m = _as_bool(mask, x).to(_float(x).dtype)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ_i m_i x_i / Σ_i m_i; 0 where nothing is selected (empty rows give 0, not nan).

    Shapes: x [...], mask broadcastable to x; ``dim`` as in :func:`masked_sum`.
    """
    total = masked_sum(_float(x), mask, dim)
    count = masked_count(x, mask, dim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the selected positions (scalar), two-pass: Σ m (x − μ)² / (n − 1).

    ``unbiased=True`` divides by n − 1 (Bessel), else by n. With n ≤ 1 the unbiased
    estimate is undefined and the biased one (0) is returned instead; with n = 0 it is 0.
    """
    x = _float(x).masked_fill(~_as_bool(mask, x), 0)  # no nan from padding, even in gradients
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    n = masked_count(x, mask)
    denom = n - 1 if unbiased else n
    denom = torch.where(denom >= 1, denom, n.clamp(min=1))
    return sq / denom


def masked_moments(x: Tensor, mask: Tensor) -> Moments:
    """Local (this process) sums ``(Σ m x, Σ m x², Σ m)`` as three scalar tensors, detached.

    All-reduce (sum) each of them across processes, then pass the tuple as ``stats`` to
    :func:`masked_whiten` so that every process whitens with the global mean/std. They are
    float64 (float32 on MPS, which has no float64) because S₂ − S²/n cancels badly in float32
    when the mean is large compared with the spread.
    """
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    xf = x.detach().to(dtype)
    return masked_sum(xf, mask), masked_sum(xf * xf, mask), masked_count(xf, mask)


def mean_var_from_moments(stats: Moments) -> tuple[Tensor, Tensor]:
    """(mean, unbiased variance) from summed moments: μ = S/n, σ² = (S₂ − S²/n)/(n − 1).

    As in :func:`masked_var`, n ≤ 1 falls back to dividing by max(n, 1). The variance is clamped
    at 0 (rounding can make S₂ − S²/n slightly negative).
    """
    total, total_sq, count = (_float(torch.as_tensor(s)) for s in stats)
    n = count.clamp(min=1)
    mean = total / n
    denom = torch.where(count - 1 >= 1, count - 1, n)
    var = ((total_sq - total * total / n) / denom).clamp(min=0)
    return mean, var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: Moments | None = None,
) -> Tensor:
    """(x − μ) / sqrt(σ² + eps) with the *masked* mean μ and unbiased variance σ².

    Shapes: x [...], mask broadcastable to x; returns x's shape and float dtype, 0 where
    mask = 0. ``shift_mean=False`` keeps the mean: (x − μ)/sqrt(σ² + eps) + μ.
    ``stats``: ``(Σ m x, Σ m x², Σ m)`` already summed over all processes (see
    :func:`masked_moments`); when None, μ and σ² come from this ``x`` alone.
    """
    keep = _as_bool(mask, x)
    xf = _float(x).masked_fill(~keep, 0)  # no nan from padding, even in gradients
    if stats is None:
        mean, var = masked_mean(xf, mask), masked_var(xf, mask)
    else:
        mean, var = mean_var_from_moments(stats)
    mean, var = mean.to(xf), var.to(xf)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~keep, 0)
