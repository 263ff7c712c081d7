"""DAPO / Dr. GRPO maths, each formula against numbers worked by hand: clip-higher, the loss
aggregations (and their micro-batch / multi-process accumulation), the reward scalings of
group-relative advantages, the soft overlong penalty, which groups carry a signal."""

from __future__ import annotations

import math

import pytest
import torch
from tensor_helpers import t

from rlhf_cli.algorithms.advantages import GROUP_BASELINES, group_advantages, informative_groups
from rlhf_cli.algorithms.aggregation import AGGREGATIONS, aggregation
from rlhf_cli.algorithms.catalog import LOSS_AGGREGATION_NAMES, OVERLONG_HANDLINGS, REWARD_SCALINGS
from rlhf_cli.algorithms.overlong import soft_overlong_penalty
from rlhf_cli.algorithms.ppo import estimate_advantages, policy_loss
from rlhf_cli.schema import PPOSection


def per_token(losses, mask):
    return losses


def test_schema_names_are_the_registries():
    import dataclasses

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(PPOSection)}
    assert choices["loss_aggregation"] == LOSS_AGGREGATION_NAMES == tuple(AGGREGATIONS)
    assert choices["scale_rewards"] == REWARD_SCALINGS and choices["overlong"] == OVERLONG_HANDLINGS


# ------------------------------------------------------------------------ clip-higher
def test_clip_higher_bounds_the_ratio_at_one_plus_high_and_one_minus_low():
    ratios = t(0.7, 1.25, 1.35)
    logp, old = ratios.log()[None], torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    up, _ = policy_loss(logp, old, torch.ones(1, 3), mask, 0.2, clip_range_high=0.28, aggregate=per_token)
    # A = +1: max(−r, −clip(r, 0.8, 1.28)): 0.7 stays (the min side binds only for A < 0),
    # 1.25 is inside [0.8, 1.28], 1.35 is clipped at 1.28 (symmetric 0.2 would clip 1.25 at 1.2)
    torch.testing.assert_close(up[0], t(-0.7, -1.25, -1.28))
    symmetric, _ = policy_loss(logp, old, torch.ones(1, 3), mask, 0.2, aggregate=per_token)
    torch.testing.assert_close(symmetric[0], t(-0.7, -1.2, -1.2))
    down, stats = policy_loss(logp, old, -torch.ones(1, 3), mask, 0.2, clip_range_high=0.28,
                              aggregate=per_token)
    # A = −1: max(r, clip(r, 0.8, 1.28)): 0.7 -> 0.8 (clipped low), the others unclipped
    torch.testing.assert_close(down[0], t(0.8, 1.25, 1.35))
    assert float(stats["clip_frac"]) == pytest.approx(1 / 3)
    loss, _ = policy_loss(logp, old, torch.ones(1, 3), mask, 0.2, clip_range_high=0.28)
    assert float(loss) == pytest.approx((-0.7 - 1.25 - 1.28) / 3)  # default aggregate: token-mean


# ------------------------------------------------------------------------ aggregation
LOSSES = t(1.0, 2.0, 3.0, 7.0, 4.0, 7.0, 7.0, 7.0, 9.0, 9.0, 9.0, 9.0).view(3, 4)
MASK = t(1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0).view(3, 4)  # lengths 3, 1 and an empty row


@pytest.mark.parametrize(("name", "expected", "units"), [
    ("token-mean", (1 + 2 + 3 + 4) / 4, 4),  # over the 4 tokens
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2, 2),  # over the 2 rows with tokens
    ("seq-mean-token-sum-norm", ((1 + 2 + 3) / 4 + 4 / 4 + 0) / 3, 3),  # sums / L=4, over 3 rows
])
def test_each_aggregation_by_hand(name, expected, units):
    aggregate, count = aggregation(name, max_len=4)
    assert float(aggregate(LOSSES, MASK)) == pytest.approx(expected)
    assert float(count(MASK)) == units


def test_an_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        aggregation("seq-sum")


@pytest.mark.parametrize("name", LOSS_AGGREGATION_NAMES)
@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_parts_weighted_by_their_units_give_the_whole_minibatch(name, pieces):
    """As update.py accumulates: 2 processes each hold half of the minibatch, in `pieces`
    micro-batches; a part's aggregate × its units × world / the minibatch's units, summed over
    the parts and averaged over the processes (as DDP does), is the whole minibatch's loss."""
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(8, 5, generator=gen)
    lengths = t(5, 1, 3, 0, 2, 5, 4, 1)
    mask = (torch.arange(5)[None] < lengths[:, None]).float()
    aggregate, units = aggregation(name, max_len=5)
    world, total_units = 2, float(units(mask))
    per_process = []
    for rows in torch.arange(8).chunk(world):
        part = sum(float(aggregate(losses[r], mask[r])) * float(units(mask[r])) * world / total_units
                   for r in rows.tensor_split(pieces))
        per_process.append(part)
    assert sum(per_process) / world == pytest.approx(float(aggregate(losses, mask)), rel=1e-6)


# ------------------------------------------------------------------------ reward scaling
SCORES = t(1, 0, 0, 0, 3, 1, 1, 1)  # two groups of 4: deviations (.75, −.25 ×3) and (1.5, −.5 ×3)
CENTRED = t(0.75, -0.25, -0.25, -0.25, 1.5, -0.5, -0.5, -0.5)
BATCH_STD = math.sqrt((13 - 7**2 / 8) / 7)  # Σx² = 13, Σx = 7, n = 8, unbiased


@pytest.mark.parametrize(("kind", "scale", "expected"), [
    ("grpo", "group", CENTRED / t(0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1)),  # group stds 0.5 and 1.0
    ("grpo", "none", CENTRED),
    ("grpo", "batch", CENTRED / BATCH_STD),
    ("rloo", "none", CENTRED * 4 / 3),  # r − mean of the other 3 = G/(G−1)·(r − mean)
    ("rloo", "group", CENTRED * 4 / 3 / t(0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1)),
])
def test_group_advantage_scalings_by_hand(kind, scale, expected):
    torch.testing.assert_close(group_advantages(kind, SCORES, 4, scale), expected, rtol=1e-5, atol=1e-5)


def test_batch_scaling_divides_by_the_std_of_every_process():
    """A second process with the same scores: n = 16, Σx² = 26, Σx = 14."""
    doubled = group_advantages("grpo", SCORES, 4, "batch", reduce=lambda m: tuple(2 * x for x in m))
    torch.testing.assert_close(doubled, CENTRED / math.sqrt((26 - 14**2 / 16) / 15), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_auto_scaling_is_each_estimators_own_bit_for_bit(kind):
    scores = torch.rand(12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(group_advantages(kind, scores, 4, "auto"), GROUP_BASELINES[kind](scores, 4))
    kl, mask = torch.zeros(12, 3), torch.ones(12, 3)
    before, _ = estimate_advantages(kind, scores, kl, mask, 0.0, group_size=4)
    assert torch.equal(before[:, -1], GROUP_BASELINES[kind](scores, 4))


def test_dr_grpo_keeps_the_score_scale():
    """Without the std the advantage of a near-unanimous group stays small (Dr. GRPO's point:
    dividing by a tiny std blows such groups up)."""
    scores = t(1.0, 1.0, 1.0, 0.9)
    assert float(group_advantages("grpo", scores, 4, "none").abs().max()) == pytest.approx(0.075)
    assert float(group_advantages("grpo", scores, 4, "group").abs().max()) == pytest.approx(1.5, rel=1e-4)


# ------------------------------------------------------------------------ overlong, groups
def test_soft_overlong_penalty_by_hand():
    lengths = torch.tensor([5, 8, 9, 10, 12])
    # L_max 12, L_cache 4: 0 up to 8 tokens, then (8 − |y|)/4
    torch.testing.assert_close(soft_overlong_penalty(lengths, 12, 4), t(0, 0, -0.25, -0.5, -1.0))
    torch.testing.assert_close(soft_overlong_penalty(torch.tensor([13]), 12, 4), t(-1.0))
    with pytest.raises(ValueError):
        soft_overlong_penalty(lengths, 12, 13)


def test_informative_groups_are_those_not_all_equal():
    scores = t(1, 1, 1, 0, 0, 0, 0.5, 0.25, 0.5)
    assert informative_groups(scores, 3).tolist() == [False, False, True]
