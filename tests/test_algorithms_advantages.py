"""Critic-free advantages (GRPO, RLOO, REINFORCE++), checked by hand."""

from __future__ import annotations

import pytest
import torch
from tensor_helpers import close

from rlhf_cli.algorithms.advantages import (
    discounted_returns,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_cli.algorithms.masked import masked_moments, masked_whiten

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


# ------------------------------------------ estimate_advantages: what a PPO run trains on
# Two prompts x two samples (rows 0-1 and 2-3 are the groups), three response positions.
EST_SCORES = torch.tensor([1.0, 3.0, 2.0, 2.0])
EST_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
EST_KL = torch.tensor([[0.2, 0.0, 0.4], [0.1, 0.3, 9.0], [0.5, 7.0, 7.0], [0.0, 0.0, 0.0]])  # 9, 7: padding


def estimate(kind, kl_coef=0.5, **kwargs):
    from rlhf_cli.algorithms.ppo import estimate_advantages

    return estimate_advantages(kind, EST_SCORES, EST_KL, EST_MASK, kl_coef, gamma=1.0, group_size=2, **kwargs)


def test_estimate_grpo_by_hand():
    # group [1, 3]: mean 2, unbiased std √2 -> −0.707107, +0.707107; group [2, 2] -> 0, 0.
    # Token rewards −0.5·kl, the group advantage added at the last token, then returns (γ = 1):
    #   row 0: [−0.1, 0, −0.2 − 0.707107]        -> G = [−1.007107, −0.907107, −0.907107]
    #   row 1: [−0.05, −0.15 + 0.707107]         -> G = [0.507107, 0.557107, 0]
    #   row 2: [−0.25 + 0]                       -> G = [−0.25, 0, 0]
    #   row 3: all 0                             -> G = 0
    advantages, returns = estimate("grpo")
    expected = [[-1.007107, -0.907107, -0.907107], [0.507107, 0.557107, 0.0], [-0.25, 0.0, 0.0], [0.0] * 3]
    close(advantages, expected)  # not whitened: the group baseline centres it
    close(returns, expected)
    # Without the KL term every token of a sample carries exactly its sequence advantage.
    advantages, _ = estimate("grpo", kl_coef=0.0)
    close(advantages, [[-0.707107] * 3, [0.707107, 0.707107, 0.0], [0.0] * 3, [0.0] * 3])


def test_estimate_rloo_by_hand():
    # group [1, 3]: 1 − 3 = −2, 3 − 1 = +2; group [2, 2] -> 0, 0.
    #   row 0: [−0.1, 0, −0.2 − 2]  -> G = [−2.3, −2.2, −2.2]
    #   row 1: [−0.05, −0.15 + 2]   -> G = [1.8, 1.85, 0]
    #   rows 2, 3 as for GRPO
    advantages, _ = estimate("rloo")
    close(advantages, [[-2.3, -2.2, -2.2], [1.8, 1.85, 0.0], [-0.25, 0.0, 0.0], [0.0] * 3])


def test_estimate_reinforce_pp_by_hand():
    # The raw score at the last token: rows [−0.1, 0, 0.8], [−0.05, 2.85], [1.75], [0, 0, 2]
    # -> G = [0.7, 0.8, 0.8], [2.8, 2.85], [1.75], [2, 2, 2]. Over the 9 masked tokens:
    # mean 15.7/9 = 1.744444; Σ(x − mean)² = 5.407222, unbiased var 0.675903, std 0.822133;
    # (G − mean)/std:
    advantages, returns = estimate("reinforce_pp")
    close(returns, [[0.7, 0.8, 0.8], [2.8, 2.85, 0.0], [1.75, 0.0, 0.0], [2.0, 2.0, 2.0]])
    close(advantages, [[-1.270408, -1.148773, -1.148773], [1.283923, 1.344740, 0.0],
                       [0.006757, 0.0, 0.0], [0.310845, 0.310845, 0.310845]])


def test_estimate_gae_by_hand():
    from rlhf_cli.algorithms.ppo import estimate_advantages

    # γ = λ = 1, β = 0. Row 0: rewards [0, 1], V [0.5, 1.0]: δ1 = 1 − 1 = 0, δ0 = 0 + 1 − 0.5 = 0.5
    # -> A = [0.5, 0]. Row 1 (one token, score 0): δ0 = −0.2 -> A = −0.2.
    # Whitened over 0.5, 0, −0.2: mean 0.1, unbiased var 0.26/2 = 0.13, std 0.360555.
    values = torch.tensor([[0.5, 1.0], [0.2, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages, returns = estimate_advantages("gae", torch.tensor([1.0, 0.0]), torch.zeros(2, 2), mask, 0.0,
                                              values=values, gamma=1.0, lam=1.0)
    close(advantages, [[1.109400, -0.277350], [-0.832050, 0.0]])
    close(returns, [[1.0, 1.0], [0.0, 0.0]])  # A + V, unwhitened: the critic's target
    with pytest.raises(ValueError, match="values"):
        estimate_advantages("gae", torch.tensor([1.0, 0.0]), torch.zeros(2, 2), mask, 0.0)


def test_estimate_whitens_with_the_moments_of_all_processes():
    """`reduce` receives this process's moments and returns the all-process sums."""
    from rlhf_cli.algorithms.ppo import estimate_advantages

    seen = []

    def two_processes(moments):  # a second process holding the same batch: the same mean/std
        seen.append(moments)
        return tuple(2 * m for m in moments)

    alone, _ = estimate("reinforce_pp")
    both, _ = estimate("reinforce_pp", reduce=two_processes)
    assert len(seen) == 1 and float(seen[0][2]) == 9  # Σ m = 9 masked tokens
    # n = 18 instead of 9: the unbiased variance is 5.407222·2/17 instead of 5.407222/8.
    close(both, alone * (0.675903 / (2 * 5.407222 / 17)) ** 0.5)
    grouped, _ = estimate("grpo", reduce=two_processes)  # group estimators do not whiten
    assert len(seen) == 1 and torch.equal(grouped, estimate("grpo")[0])
    with pytest.raises(ValueError, match="unknown advantage"):
        estimate_advantages("ppo2", EST_SCORES, EST_KL, EST_MASK, 0.1)
