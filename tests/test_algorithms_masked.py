"""Masked reductions and whitening, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import torch
from tensor_helpers import close

from rlhf_cli.algorithms.masked import (
    last_token_index,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    mean_var_from_moments,
)

# Selected values: 1, 2, 6 (row 0) and 3 (row 1); the nan and the 50 are padding.
X = torch.tensor([[1.0, 2.0, 6.0], [3.0, 50.0, float("nan")]])
M = torch.tensor([[1, 1, 1], [1, 0, 0]])
# sum = 12, count = 4, mean = 3; deviations -2, -1, 3, 0 -> squares 4 + 1 + 9 + 0 = 14
# unbiased var = 14/3 = 4.666667, std = 2.160247; biased var = 14/4 = 3.5
STD = math.sqrt(14 / 3)


def test_masked_sum_and_mean():
    close(masked_sum(X, M), 12.0)
    close(masked_sum(X, M, dim=1), [9.0, 3.0])  # 1+2+6, 3
    close(masked_mean(X, M), 3.0)
    close(masked_mean(X, M, dim=1), [3.0, 3.0])  # 9/3, 3/1
    close(masked_mean(X, M.bool(), dim=0), [2.0, 2.0, 6.0])  # (1+3)/2, 2/1, 6/1


def test_masked_mean_of_empty_row_is_zero():
    close(masked_mean(X, torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=1), [1.0, 0.0])
    close(masked_mean(X, torch.zeros(2, 3)), 0.0)


def test_masked_var():
    close(masked_var(X, M), 14 / 3)
    close(masked_var(X, M, unbiased=False), 3.5)
    # a single selected value: unbiased is undefined -> 0, not nan
    close(masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]])), 0.0)


def test_masked_whiten_by_hand():
    out = masked_whiten(X, M)
    # (1-3)/2.160247 = -0.925820, (2-3)/.. = -0.462910, (6-3)/.. = 1.388730, (3-3) = 0; padding -> 0
    close(out, [[-0.925820, -0.462910, 1.388730], [0.0, 0.0, 0.0]])
    kept = masked_whiten(X, M, shift_mean=False)
    # same plus the mean 3: 2.074180, 2.537090, 4.388730, 3
    close(kept, [[2.074180, 2.537090, 4.388730], [3.0, 0.0, 0.0]])
    # whitened selection has mean 0 and (unbiased) std 1
    close(masked_mean(out, M), 0.0)
    close(masked_var(out, M), 1.0, atol=1e-4)


def test_unmasked_mean_gives_a_different_answer():
    x = torch.nan_to_num(X, nan=-7.0)
    # unmasked mean = (1+2+6+3+50-7)/6 = 55/6 = 9.1667, not the masked 3
    close(x.mean(), 55 / 6)
    naive = (x - x.mean()) / x.std()
    assert abs(naive[0, 0].item() - (-0.925820)) > 0.1
    close(masked_whiten(x, M)[0, 0], -0.925820)  # padding value does not matter


def test_moments_and_global_stats_across_processes():
    s, s2, n = masked_moments(X, M)
    close(torch.stack([s, s2, n]).float(), [12.0, 50.0, 4.0])  # 1+4+36+9 = 50
    mean, var = mean_var_from_moments((s, s2, n))
    close(mean.float(), 3.0)
    close(var.float(), 14 / 3)  # (50 - 12²/4)/3 = 14/3
    # "process A" holds row 0, "process B" row 1; all-reduce = elementwise sum of their moments
    a = masked_moments(X[:1], M[:1])  # (9, 41, 3)
    b = masked_moments(X[1:], M[1:])  # (3, 9, 1)
    global_stats = tuple(u + v for u, v in zip(a, b, strict=True))
    close(masked_whiten(X[:1], M[:1], stats=global_stats), [[-0.925820, -0.462910, 1.388730]])
    close(masked_whiten(X[1:], M[1:], stats=global_stats), [[0.0, 0.0, 0.0]])
    # local-only whitening of row 0: mean 3, var (4+1+9)/2 = 7 -> (1-3)/sqrt(7) = -0.755929
    close(masked_whiten(X[:1], M[:1])[0, 0], -0.755929)


def test_whiten_keeps_gradients_finite_under_nan_padding():
    x = X.clone().requires_grad_(True)
    masked_whiten(x, M).sum().backward()
    assert torch.isfinite(x.grad).all()
    close(x.grad[1, 1:], [0.0, 0.0])


def test_last_token_index_comes_from_the_mask_and_is_minus_one_for_an_empty_row():
    mask = torch.tensor([[1, 1, 1, 0, 0],   # right padding -> 2
                         [0, 0, 1, 1, 1],   # left padding -> 4
                         [1, 1, 1, 1, 1],   # none -> 4
                         [0, 1, 1, 0, 0],   # a prefix before, padding after -> 2
                         [0, 0, 0, 0, 0]])  # all padding: no last token -> -1, never a padding index
    assert last_token_index(mask).tolist() == [2, 4, 4, 2, -1]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 4, 2, -1]  # any mask dtype
