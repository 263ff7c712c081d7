"""Reward-model and DPO-family losses (see ALGORITHMS.md, "Reward model" and "DPO family").

Conventions: B pairs; every ``*_logps`` argument is the SUM of the response tokens' log-probs
(prompt and padding excluded); ``*_lengths`` are the response token counts [B]. "Length
normalised" always means summed logps / response token count (per-token average log-prob).
All returned losses are per pair [B]: the caller takes the mean (and any cross-process
reduction). Returned rewards are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")
_SMOOTHABLE = ("sigmoid", "robust", "simpo")
_REFERENCE_FREE = ("simpo", "orpo")


def pairwise_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: float | Tensor = 0.0,
    center_weight: float = 0.0,
) -> Tensor:
    """Bradley–Terry loss per pair: −log σ(r_w − r_l − m) + λ·(r_w + r_l)².

    Shapes: chosen_rewards [B], rejected_rewards [B], margin float or [B]; returns [B].
    −log σ is computed as −logsigmoid (stable for large |r_w − r_l|). λ = ``center_weight``
    pulls the rewards towards zero mean.
    """
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_weight:
        loss = loss + center_weight * (chosen_rewards + rejected_rewards) ** 2
    return loss


def reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """Per-pair metrics [B] (float, detached); average them (over processes too) to report.

    ``accuracy`` = 1 if r_w > r_l else 0 (a tie counts as WRONG); ``margin`` = r_w − r_l;
    ``chosen`` / ``rejected`` = the rewards themselves (for the reward mean/std over both).
    """
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {
        "accuracy": (chosen > rejected).float(),
        "margin": chosen - rejected,
        "chosen": chosen,
        "rejected": rejected,
    }


def _smoothed_sigmoid_loss(logits: Tensor, eps: float) -> Tensor:
    """cDPO: −(1−ε)·log σ(x) − ε·log σ(−x)."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _robust_loss(logits: Tensor, eps: float) -> Tensor:
    """Robust DPO: [−(1−ε)·log σ(x) + ε·log σ(−x)] / (1 − 2ε)."""
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (log(−expm1 x) near 0, log1p(−exp x) below −ln 2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(avg_logps: Tensor, max_logp: float = -1e-6) -> Tensor:
    """log(p / (1 − p)) = log p − log(1 − p) with log p = ``avg_logps`` (clamped ≤ ``max_logp``).

    The clamp keeps p < 1 so the odds stay finite when a response is (nearly) certain.
    """
    x = avg_logps.clamp(max=max_logp)
    return x - log1mexp(x)


def _normalised(logps: Tensor, lengths: Tensor | None, loss_type: str, which: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"dpo_loss(loss_type={loss_type!r}) needs {which}_lengths (response token counts)")
    return logps / lengths.to(logps).clamp(min=1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
    chosen_nll: Tensor | None = None,
    orpo_lambda: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family losses. Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.

    Inputs [B], logps summed over response tokens. Δ = (logπ_w − logπ_ref,w) − (logπ_l − logπ_ref,l).

    - ``sigmoid``: −log σ(βΔ); with ε = ``label_smoothing`` (cDPO): −(1−ε) log σ(βΔ) − ε log σ(−βΔ).
    - ``robust``:  [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε), ε < 0.5.
    - ``hinge``:   max(0, 1 − βΔ).
    - ``ipo``:     (Δ̄ − 1/(2β))², Δ̄ the same Δ with every logp divided by its response length
      (policy and reference of y_w by ``chosen_lengths``, of y_l by ``rejected_lengths``).
    - ``simpo`` (ref args may be None): −log σ(β·ā_w − β·ā_l − γ), ā = logp / length, γ =
      ``simpo_gamma``; ``label_smoothing`` applies as in cDPO.
    - ``orpo`` (ref args may be None): NLL_w + λ·(−log σ(log odds_w − log odds_l)), odds = p/(1−p)
      with log p = ā (see :func:`log_odds`), NLL_w = ``chosen_nll`` [B] (per-token average NLL of
      y_w, with grad), λ = ``orpo_lambda``.

    Rewards (detached): β·(logπ − logπ_ref) on SUMMED logps for sigmoid/robust/hinge/ipo;
    β·ā (length-averaged policy logp) for the reference-free simpo and orpo.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if label_smoothing and loss_type not in _SMOOTHABLE:
        raise ValueError(f"label_smoothing applies to {', '.join(_SMOOTHABLE)}, not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

    if loss_type in _REFERENCE_FREE:
        avg_w = _normalised(policy_chosen_logps, chosen_lengths, loss_type, "chosen")
        avg_l = _normalised(policy_rejected_logps, rejected_lengths, loss_type, "rejected")
        if loss_type == "simpo":
            losses = _smoothed_sigmoid_loss(beta * (avg_w - avg_l) - simpo_gamma, label_smoothing)
        else:
            if chosen_nll is None:
                raise ValueError("dpo_loss(loss_type='orpo') needs chosen_nll (per-token average NLL of y_w)")
            losses = chosen_nll - orpo_lambda * F.logsigmoid(log_odds(avg_w) - log_odds(avg_l))
        return losses, (beta * avg_w).detach(), (beta * avg_l).detach()

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"dpo_loss(loss_type={loss_type!r}) needs reference log-probs")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    elif loss_type == "robust":
        losses = _robust_loss(logits, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    else:  # ipo
        delta = _normalised(chosen_ratio, chosen_lengths, loss_type, "chosen") - _normalised(
            rejected_ratio, rejected_lengths, loss_type, "rejected"
        )
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: float | Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO per example [B]: r = logπ − logπ_ref (summed logps), z = max(kl, 0) detached.

    desirable (label True):    λ_D·(1 − σ(β(r − z)))
    undesirable (label False): λ_U·(1 − σ(β(z − r)))

    Shapes: policy_logps, ref_logps, labels (bool) [B]; ``kl`` a scalar (the batch KL estimate,
    e.g. the mean of logπ − logπ_ref on mismatched completions, already reduced over processes).
    """
    z = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    return torch.where(labels.to(torch.bool), desirable, undesirable)
