"""Critic-free advantages (GRPO, RLOO, REINFORCE++), checked by hand."""

from __future__ import annotations

import pytest
import torch

from rlhf_cli.algorithms.advantages import (
    discounted_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_cli.algorithms.masked import masked_moments, masked_whiten


def close(actual, expected, atol=1e-5):
    actual = torch.as_tensor(actual)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# two prompts × 3 samples: group 1 = [1, 2, 6], group 2 = [4, 4, 4]
SCORES = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])


def test_grpo_by_hand():
    # group 1: mean 3, deviations −2, −1, 3; squares 14; unbiased var 14/2 = 7, std 2.645751
    #   -> −2/2.645751 = −0.755929, −0.377964, 1.133893
    # group 2: all equal -> 0 (0/(0 + eps))
    close(grpo_advantages(SCORES, 3), [-0.755929, -0.377964, 1.133893, 0.0, 0.0, 0.0])
    close(grpo_advantages(SCORES, 3, scale_by_std=False), [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    # one group of 6 is a different answer: the grouping matters
    assert not torch.allclose(grpo_advantages(SCORES, 6), grpo_advantages(SCORES, 3))


def test_rloo_by_hand():
    # group 1: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> −3, −1.5, 4.5
    #   (= 3/2·(r − mean 3) = 1.5·[−2, −1, 3]); group 2 -> 0
    close(rloo_advantages(SCORES, 3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])


def test_group_size_is_checked():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(SCORES, 4)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(SCORES, 1)


REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_discounted_returns_by_hand():
    # γ = 0.5; row 0: G2 = 1, G1 = 0.5, G0 = 0.25; row 1 (pad 9 ignored): G1 = 2, G0 = 1
    close(discounted_returns(REWARDS, MASK, 0.5), [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]])


def test_reinforce_pp_by_hand():
    # returns 0.25, 0.5, 1, 1, 2: mean 4.75/5 = 0.95; deviations −0.7, −0.45, 0.05, 0.05, 1.05
    # squares 0.49 + 0.2025 + 0.0025 + 0.0025 + 1.1025 = 1.8; unbiased var 1.8/4 = 0.45, std 0.670820
    # -> −1.043498, −0.670820, 0.074536 | 0.074536, 1.565248, (pad) 0
    expected = [[-1.043498, -0.670820, 0.074536], [0.074536, 1.565248, 0.0]]
    close(reinforce_pp_advantages(REWARDS, MASK, gamma=0.5), expected)
    # the same with "global" stats summed over two processes (one row each)
    returns = discounted_returns(REWARDS, MASK, 0.5)
    parts = [masked_moments(returns[i : i + 1], MASK[i : i + 1]) for i in range(2)]
    stats = tuple(a + b for a, b in zip(*parts, strict=True))
    close(masked_whiten(returns[1:], MASK[1:], stats=stats), expected[1:])
