"""Reward-model and DPO-family losses, checked against numbers worked out by hand.

Useful values: −log σ(x) = log(1 + e^{−x}), and −log σ(−x) = −log σ(x) + x.
  −log σ(1)    = log(1.367879) = 0.313262     −log σ(−1)   = log(3.718282) = 1.313262
  −log σ(0.5)  = log(1.606531) = 0.474077     −log σ(−0.5) = log(2.648721) = 0.974077
  −log σ(0)    = log 2 = 0.693147             −log σ(−1.5) = log(5.481689) = 1.701413
  −log σ(−2.5) = log(13.182494) = 2.578890
"""

from __future__ import annotations

import math

import pytest
import torch
from tensor_helpers import close, t

from rlhf_cli.algorithms.preference import (
    ORPOLoss,
    SigmoidLoss,
    SimPOLoss,
    kto_loss,
    log_odds,
    pairwise_reward_loss,
    preference_loss,
    reward_metrics,
)
from rlhf_cli.schema import DPOSection


# ---------------------------------------------------------------- reward model
def test_pairwise_reward_loss_by_hand():
    chosen, rejected = t(2.0, 0.0), t(1.5, 1.0)  # differences 0.5 and −1
    close(pairwise_reward_loss(chosen, rejected), [0.474077, 1.313262])
    # margin 0.5: differences 0 and −1.5 -> log 2, 1.701413
    close(pairwise_reward_loss(chosen, rejected, margin=0.5), [0.693147, 1.701413])
    # per-pair margin [0.5, 0]: 0 and −1
    close(pairwise_reward_loss(chosen, rejected, margin=t(0.5, 0.0)), [0.693147, 1.313262])
    # centring 0.1·(r_w + r_l)²: 0.1·3.5² = 1.225, 0.1·1² = 0.1
    close(pairwise_reward_loss(chosen, rejected, center_weight=0.1), [0.474077 + 1.225, 1.313262 + 0.1])


def test_pairwise_reward_loss_is_stable():
    # naive log(sigmoid(−200)) = log(0) = −inf in float32; logsigmoid gives 200
    close(pairwise_reward_loss(t(0.0), t(200.0)), [200.0])
    close(pairwise_reward_loss(t(200.0), t(0.0)), [0.0])


def test_reward_metrics_ties_are_wrong():
    m = reward_metrics(t(1.0, 2.0, 3.0), t(0.0, 2.0, 4.0))
    close(m["accuracy"], [1.0, 0.0, 0.0])  # 1 > 0 right, 2 = 2 tie -> wrong, 3 < 4 wrong
    close(m["margin"], [1.0, 0.0, -1.0])
    close(m["chosen"], [1.0, 2.0, 3.0])
    close(m["rejected"], [0.0, 2.0, 4.0])


# ---------------------------------------------------------------- DPO family
# Two pairs, β = 0.5.
#   pair 1: π_w −10, π_l −12, ref_w −11, ref_l −11 -> ratios +1, −1, Δ = 2,  βΔ = 1
#   pair 2: π_w −8,  π_l −7,  ref_w −9,  ref_l −9  -> ratios +1, +2, Δ = −1, βΔ = −0.5
PC, PR, RC, RR = t(-10.0, -8.0), t(-12.0, -7.0), t(-11.0, -9.0), t(-11.0, -9.0)


def dpo(loss_type, beta=0.5, label_smoothing=0.0, **inputs):
    """The loss as a run builds it from its `dpo` section, applied to the two pairs above."""
    loss = preference_loss(DPOSection(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing))
    return loss(PC, PR, RC, RR, **inputs)


def test_dpo_at_reference_is_log2():
    logps = t(-3.0, -20.0)
    losses, chosen, rejected = SigmoidLoss(beta=0.1)(logps, logps - 1, logps, logps - 1)
    close(losses, [math.log(2)] * 2, atol=1e-7)
    close(chosen, [0.0, 0.0])
    close(rejected, [0.0, 0.0])


def test_dpo_sigmoid_by_hand():
    losses, chosen, rejected = dpo("sigmoid")
    close(losses, [0.313262, 0.974077])  # −log σ(1), −log σ(−0.5)
    close(chosen, [0.5, 0.5])  # β·(+1), β·(+1)
    close(rejected, [-0.5, 1.0])  # β·(−1), β·(+2)


def test_cdpo_label_smoothing_by_hand():
    # −0.9·log σ(x) − 0.1·log σ(−x) = L + 0.1x with L = −log σ(x)
    # x = 1: 0.9·0.313262 + 0.1·1.313262 = 0.413262; x = −0.5: 0.9·0.974077 + 0.1·0.474077 = 0.924077
    losses, _, _ = dpo("sigmoid", label_smoothing=0.1)
    close(losses, [0.413262, 0.924077])


def test_robust_by_hand():
    # [−0.9·log σ(x) + 0.1·log σ(−x)]/0.8 = (0.8L − 0.1x)/0.8 = L − x/8
    # x = 1: (0.281936 − 0.131326)/0.8 = 0.188262; x = −0.5: 0.974077 + 0.0625 = 1.036577
    losses, _, _ = dpo("robust", label_smoothing=0.1)
    close(losses, [0.188262, 1.036577])
    close(dpo("robust")[0], [0.313262, 0.974077])  # ε = 0 is plain DPO


def test_hinge_by_hand():
    close(dpo("hinge")[0], [0.0, 1.5])  # max(0, 1 − 1) = 0, max(0, 1 + 0.5) = 1.5


def test_ipo_by_hand():
    # lengths: chosen [2, 4], rejected [4, 2]; 1/(2β) = 1
    # pair 1: Δ̄ = (+1)/2 − (−1)/4 = 0.75   -> (0.75 − 1)² = 0.0625
    # pair 2: Δ̄ = (+1)/4 − (+2)/2 = −0.75  -> (−0.75 − 1)² = 3.0625
    losses, chosen, rejected = dpo("ipo", chosen_lengths=t(2, 4), rejected_lengths=t(4, 2))
    close(losses, [0.0625, 3.0625])
    close(chosen, [0.5, 0.5])  # rewards stay β·(summed log-ratio)
    close(rejected, [-0.5, 1.0])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo("ipo")


# Reference-free pairs: logps π_w [−4, −6], π_l [−9, −4]; lengths w [4, 3], l [6, 4]
# -> averages ā_w = [−1, −2], ā_l = [−1.5, −1]
FREE = dict(chosen_lengths=t(4, 3), rejected_lengths=t(6, 4))


def test_simpo_by_hand():
    # β = 2, γ = 0.5: pair 1: 2·(−1 + 1.5) − 0.5 = 0.5 -> 0.474077
    #                 pair 2: 2·(−2 + 1) − 0.5 = −2.5 -> 2.578890
    simpo = SimPOLoss(beta=2.0, gamma=0.5)
    losses, chosen, rejected = simpo(t(-4.0, -6.0), t(-9.0, -4.0), None, None, **FREE)
    close(losses, [0.474077, 2.578890])
    close(chosen, [-2.0, -4.0])  # β·ā_w
    close(rejected, [-3.0, -2.0])  # β·ā_l


def test_orpo_by_hand():
    # log odds(a) = a − log(1 − e^a):
    #   a = −1:   1 − 0.367879 = 0.632121, log = −0.458675 -> −0.541325
    #   a = −1.5: 1 − 0.223130 = 0.776870, log = −0.252483 -> −1.247517
    #   a = −2:   1 − 0.135335 = 0.864665, log = −0.145413 -> −1.854587
    close(log_odds(t(-1.0, -1.5, -2.0)), [-0.541325, -1.247517, -1.854587])
    # pair 1: diff = −0.541325 + 1.247517 = 0.706193, −log σ = log(1 + e^−0.706193) = 0.401135
    #         loss = NLL 1 + 0.1·0.401135 = 1.040114
    # pair 2: diff = −1.854587 + 0.541325 = −1.313262, −log σ = log(1 + 3.718282) = 1.551444
    #         loss = NLL 2 + 0.1·1.551444 = 2.155144
    orpo = ORPOLoss(beta=0.1, orpo_lambda=0.1)
    losses, chosen, rejected = orpo(t(-4.0, -6.0), t(-9.0, -4.0), None, None, chosen_nll=t(1.0, 2.0), **FREE)
    close(losses, [1.040114, 2.155144])
    close(chosen, [-0.1, -0.2])  # β·ā_w
    close(rejected, [-0.15, -0.1])
    with pytest.raises(ValueError, match="chosen_nll"):
        orpo(t(-4.0), t(-9.0), None, None, chosen_lengths=t(4), rejected_lengths=t(6))


def test_log_odds_is_finite_near_certainty():
    x = t(-1e-9, 0.0, -30.0).requires_grad_(True)
    out = log_odds(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    close(out[2], -30.0)  # log(1 − e^−30) ≈ 0


def test_gradient_sign_sigmoid():
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    losses, chosen, _ = SigmoidLoss(beta=0.5)(pc, pr, RC, RR)
    losses.sum().backward()
    assert (pc.grad < 0).all()  # raising logπ(y_w) lowers the loss
    assert (pr.grad > 0).all()  # raising logπ(y_l) raises it
    # d/dlogπ_w −log σ(βΔ) = −β·σ(−βΔ): −0.5·σ(−1) = −0.134471, −0.5·σ(0.5) = −0.311230
    close(pc.grad, [-0.134471, -0.311230])
    assert not chosen.requires_grad


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo("nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo("hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="reference"):
        SigmoidLoss(beta=0.1)(PC, PR, None, None)


# ---------------------------------------------------------------- KTO
def test_kto_by_hand():
    # β = 0.5, z = 0.4; r = logπ − logπ_ref = [1, −1, 0.4]
    # desirable:   1·(1 − σ(0.5·(1 − 0.4)))    = 1 − σ(0.3) = 1 − 0.574443 = 0.425557
    # undesirable: 2·(1 − σ(0.5·(0.4 + 1)))    = 2·(1 − σ(0.7)) = 2·(1 − 0.668188) = 0.663624
    # undesirable: 2·(1 − σ(0.5·(0.4 − 0.4))) = 2·0.5 = 1
    policy, ref, labels = t(-5.0, -5.0, -3.0), t(-6.0, -4.0, -3.4), torch.tensor([True, False, False])
    kl = torch.tensor(0.4, requires_grad=True)
    losses = kto_loss(policy, ref, labels, kl, beta=0.5, undesirable_weight=2.0)
    close(losses, [0.425557, 0.663624, 1.0])
    assert not losses.requires_grad  # z is detached (and no other input needs grad)
    # a negative KL estimate is clamped to 0: 1 − σ(0.5·1) = 1 − 0.622459 = 0.377541
    close(kto_loss(policy, ref, labels, -3.0, beta=0.5)[0], 0.377541)


def test_kto_gradient_sign():
    policy = t(-5.0, -5.0).requires_grad_(True)
    kto_loss(policy, t(-6.0, -4.0), torch.tensor([True, False]), 0.4, beta=0.5).sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # push desirable up, undesirable down
