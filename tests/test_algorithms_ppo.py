"""PPO maths (KL estimators, token rewards, GAE, clipped losses, controllers), checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from tensor_helpers import close, t

from rlhf_cli.algorithms.masked import masked_moments
from rlhf_cli.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    policy_loss,
    token_rewards,
    value_loss,
)


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_by_hand():
    logp, ref = t(-1.0, -2.0), t(-1.5, -1.0)
    close(kl_k1(logp, ref), [0.5, -1.0])  # logπ − logπ_ref
    close(kl_k2(logp, ref), [0.125, 0.5])  # ½·0.5², ½·1²
    # log ρ = ref − logp = [−0.5, 1]; ρ = [0.606531, 2.718282]
    # (ρ − 1) − log ρ = [−0.393469 + 0.5, 1.718282 − 1] = [0.106531, 0.718282]
    close(kl_k3(logp, ref), [0.106531, 0.718282])
    close(kl_estimate(logp, ref, "k3"), [0.106531, 0.718282])
    close(kl_estimate(logp, ref, "k2"), [0.125, 0.5])
    close(kl_estimate(logp, ref), [0.5, -1.0])
    assert torch.isfinite(kl_k3(t(0.0), t(-1000.0))).all()  # log ρ clamped to −20
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


# ---------------------------------------------------------------- rewards
def test_token_rewards_score_on_last_token_per_row():
    scores = t(2.0, -1.0, 5.0)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    out = token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: −0.5·[0.1, 0.2, 0.3] = [−0.05, −0.1, −0.15], +2 on t=2 -> 1.85
    # row 1: −0.5·[0.4, −0.2] = [−0.2, 0.1], −1 on t=1 -> −0.9; padding (kl 9) -> 0
    # row 2: empty response -> all zero, the score 5 is dropped
    close(out, [[-0.05, -0.1, 1.85], [-0.2, -0.9, 0.0], [0.0, 0.0, 0.0]])
    # a left-offset mask (prompt prefix at 0): last token is still the last 1
    close(token_rewards(t(3.0), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), 0.1), [[0.0, 0.0, 3.0]])


# ---------------------------------------------------------------- GAE
R3, V3 = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])


def test_gae_gamma1_lam095_by_hand():
    # t=2: δ = 1 + 1·0 − 0.7 = 0.3;                A2 = 0.3
    # t=1: δ = 0 + 0.7 − 0.6 = 0.1;  A1 = 0.1 + 0.95·0.3   = 0.385
    # t=0: δ = 0 + 0.6 − 0.5 = 0.1;  A0 = 0.1 + 0.95·0.385 = 0.46575
    adv, ret = gae(R3, V3, torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(adv, [[0.46575, 0.385, 0.3]])
    close(ret, [[0.96575, 0.985, 1.0]])  # A + V


def test_gae_gamma09_lam08_by_hand():
    # γλ = 0.72
    # t=2: δ = 1 − 0.7 = 0.3;                  A2 = 0.3
    # t=1: δ = 0.9·0.7 − 0.6 = 0.03;  A1 = 0.03 + 0.72·0.3   = 0.246
    # t=0: δ = 0.9·0.6 − 0.5 = 0.04;  A0 = 0.04 + 0.72·0.246 = 0.21712
    adv, ret = gae(R3, V3, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_rows_of_different_lengths():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [-0.1, 2.0, 7.0], [9.0, 0.5, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.4, 1.0, 5.0], [3.0, 0.2, 0.3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: as in the single-row example
    # row 1 (right-padded; r=7, V=5 at the pad are ignored, V after the end = 0):
    #   t=1: δ = 2 + 0 − 1 = 1;          A1 = 1
    #   t=0: δ = −0.1 + 1 − 0.4 = 0.5;   A0 = 0.5 + 0.95·1 = 1.45
    #   (using the padded V=5 would give δ1 = 2 + 5 − 1 = 6)
    # row 2 (prompt prefix at t=0):
    #   t=2: δ = 1 − 0.3 = 0.7;          A2 = 0.7
    #   t=1: δ = 0.5 + 0.3 − 0.2 = 0.6;  A1 = 0.6 + 0.95·0.7 = 1.265
    close(adv, [[0.46575, 0.385, 0.3], [1.45, 1.0, 0.0], [0.0, 1.265, 0.7]])
    close(ret, [[0.96575, 0.985, 1.0], [1.85, 2.0, 0.0], [0.0, 1.465, 1.0]])


# ---------------------------------------------------------------- policy loss
def _ratios_to_logps(ratios):
    old = torch.full((1, len(ratios)), -2.0)
    return (old + torch.log(t(*ratios))[None]).requires_grad_(True), old


def test_policy_loss_clipping_by_hand():
    # ε = 0.2; the 6th token is padding (huge advantage, must not count)
    #  a: A=+1, ratio 1.1 (inside):     max(−1.1, −1.1) = −1.1   not clipped
    #  b: A=+1, ratio 1.5 (above):      max(−1.5, −1.2) = −1.2   clipped
    #  c: A=−2, ratio 0.5 (below):      max(1.0, 1.6)   =  1.6   clipped
    #  d: A=−2, ratio 1.5 (above):      max(3.0, 2.4)   =  3.0   not clipped (pessimistic)
    #  e: A=+1, ratio 0.5 (below):      max(−0.5, −0.8) = −0.5   not clipped
    # mean = (−1.1 − 1.2 + 1.6 + 3.0 − 0.5)/5 = 1.8/5 = 0.36; clip_frac = 2/5
    logp, old = _ratios_to_logps([1.1, 1.5, 0.5, 1.5, 0.5, 1.0])
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    close(loss, 0.36)
    close(stats["clip_frac"], 0.4)
    # approx_kl = ½·mean(log² ratio): logs 0.095310, 0.405465, −0.693147, 0.405465, −0.693147
    # squares 0.009084 + 0.164402 + 0.480453 + 0.164402 + 0.480453 = 1.298794; /5/2 = 0.129879
    close(stats["approx_kl"], 0.129879)
    loss.backward()
    # dL/dlogp = −A·ratio/5 where unclipped, 0 where clipped:
    # a −1.1/5 = −0.22, b 0, c 0, d 3.0/5 = 0.6, e −0.5/5 = −0.1, pad 0
    close(logp.grad, [[-0.22, 0.0, 0.0, 0.6, -0.1, 0.0]])


def test_policy_loss_dual_clip_by_hand():
    #  d: A=−2, ratio 1.5: L = 3.0, bound −c·A = 6 -> 3.0
    #  f: A=−1, ratio 5:   max(5, 1.2) = 5, bound 3 -> 3.0 (dual clip applies)
    #  g: A=+1, ratio 5:   max(−5, −1.2) = −1.2 (no dual clip for A > 0)
    # without dual clip: (3 + 5 − 1.2)/3 = 2.266667; with c = 3: (3 + 3 − 1.2)/3 = 1.6
    logp, old = _ratios_to_logps([1.5, 5.0, 5.0])
    adv, mask = torch.tensor([[-2.0, -1.0, 1.0]]), torch.ones(1, 3)
    close(policy_loss(logp, old, adv, mask)[0], 6.8 / 3)
    loss, stats = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    close(loss, 1.6)
    close(stats["dual_clip_frac"], 1 / 3)
    # clip_frac counts only g (clipped −1.2 > −5); for f the unclipped 5 > 1.2 was kept
    close(stats["clip_frac"], 1 / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=0.5)


def test_policy_loss_log_ratio_is_clamped():
    loss, _ = policy_loss(t(0.0)[None], t(-1000.0)[None], t(-1.0)[None], torch.ones(1, 1))
    close(loss, math.exp(20), atol=1.0)  # ratio exp(20), not inf


# ---------------------------------------------------------------- value loss
def test_value_loss_by_hand():
    # ε_v = 0.2
    #  1: V=1.0, V_old=0.9, R=2: inside the clip -> 0.5·1 = 0.5
    #  2: V=1.5, V_old=1.0, R=2: (−0.5)² = 0.25; clip V to 1.2 -> (−0.8)² = 0.64 -> 0.5·0.64 = 0.32 (clipped)
    #  3: V=1.5, V_old=1.0, R=1: 0.25; clip 1.2 -> 0.04 -> 0.5·0.25 = 0.125
    #  4: padding
    # mean = (0.5 + 0.32 + 0.125)/3 = 0.315; vf_clip_frac = 1/3
    values = torch.tensor([[1.0, 1.5, 1.5, 100.0]])
    old, ret = torch.tensor([[0.9, 1.0, 1.0, 0.0]]), torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, ret, mask, clip_range_value=0.2)
    close(loss, 0.315)
    close(stats["vf_clip_frac"], 1 / 3)
    # no clipping: (0.5 + 0.125 + 0.125)/3 = 0.25
    close(value_loss(values, old, ret, mask, clip_range_value=None)[0], 0.25)


# ---------------------------------------------------------------- entropy, explained variance
def test_entropy_by_hand():
    # uniform over 2: log 2; p = [0.25, 0.75]: 0.25·1.386294 + 0.75·0.287682 = 0.562335
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)], [5.0, 5.0 + math.log(3)]])
    close(entropy_from_logits(logits), [0.693147, 0.562335, 0.562335])
    masked = torch.tensor([0.0, 0.0, float("-inf")], requires_grad=True)
    h = entropy_from_logits(masked)
    h.backward()
    close(h, 0.693147)  # a −inf logit contributes nothing
    assert torch.isfinite(masked.grad).all()


def test_explained_variance_by_hand():
    # R = [1, 2, 3], V = [1, 2, 1] (4th token padding); Var R = (1 + 0 + 1)/2 = 1
    # R − V = [0, 0, 2], mean 2/3, squares 4/9 + 4/9 + 16/9 = 8/3, /2 = 4/3 -> 1 − 4/3 = −1/3
    ret, val = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1.0, 2.0, 1.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(explained_variance(val, ret, mask), -1 / 3)
    close(explained_variance(ret, ret, mask), 1.0)
    assert torch.isnan(explained_variance(val, torch.ones(1, 4), mask))


def test_explained_variance_over_processes_equals_one_batch():
    # Two "processes" each hold half of the rows; summing their moments must give the value
    # of the whole batch, which neither half gives alone.
    torch.manual_seed(0)
    ret, val = torch.randn(6, 5), torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    whole = explained_variance(val, ret, mask)
    halves = [(val[:3], ret[:3], mask[:3]), (val[3:], ret[3:], mask[3:])]
    moments = [(masked_moments(r, m), masked_moments(r - v, m)) for v, r, m in halves]
    calls = []

    def summed(local):  # stands in for the all-reduce: the other half's matching moments
        index = len(calls) % 2
        calls.append(index)
        other = moments[1][index]
        return tuple(a + b for a, b in zip(local, other, strict=True))

    v0, r0, m0 = halves[0]
    close(explained_variance(v0, r0, m0, reduce=summed), float(whole))
    assert abs(float(explained_variance(v0, r0, m0)) - float(whole)) > 1e-3


# ---------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_one_update():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9: 9/6 − 1 = 0.5 -> clipped to 0.2; β = 0.1·(1 + 0.2·256/10000) = 0.1·1.00512 = 0.100512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)
    assert ctl.value == pytest.approx(0.100512)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 5.4: 0.9 − 1 = −0.1 (inside); β = 0.1·(1 − 0.1·0.0256) = 0.1·0.99744 = 0.099744
    assert ctl.update(5.4, 256) == pytest.approx(0.099744)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05
