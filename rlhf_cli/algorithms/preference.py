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


def _normalised(logps: Tensor, lengths: Tensor | None, name: str, which: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"the {name} loss needs {which}_lengths (response token counts)")
    return logps / lengths.to(logps).clamp(min=1)


class DPOFamilyLoss:
    """One DPO-family loss with its own recipe parameters, built once per run (`from_recipe`).

    Called per batch: ``loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *,
    chosen_lengths, rejected_lengths, chosen_nll)`` -> ``(losses [B], chosen_rewards [B],
    rejected_rewards [B])``; inputs [B], logps summed over response tokens. A loss reads only
    the inputs it needs; the reference log-probs only where ``needs_reference``.
    """

    name = ""
    needs_reference = True
    paired = True  # preference pairs; KTO reads unpaired completions
    smoothable = False  # takes cDPO's label smoothing ε
    own_keys: dict[str, str] = {}  # the loss's own constructor parameters -> their `dpo.` recipe keys

    def __init__(self, beta: float, label_smoothing: float = 0.0) -> None:
        if label_smoothing and not self.smoothable:
            smoothable = ", ".join(name for name, cls in PREFERENCE_LOSSES.items() if cls.smoothable)
            raise ValueError(f"label_smoothing applies to {smoothable}, not {self.name!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    @classmethod
    def from_recipe(cls, cfg) -> DPOFamilyLoss:
        """From the `dpo` recipe section: β, ε, and the loss's own keys. ε on a loss without
        smoothing is refused; KTO (unpaired) has always left `dpo.label_smoothing` unread."""
        own = {parameter: getattr(cfg, key) for parameter, key in cls.own_keys.items()}
        return cls(cfg.beta, cfg.label_smoothing if cls.paired else 0.0, **own)


class _RatioLoss(DPOFamilyLoss):
    """Losses of Δ = (logπ_w − logπ_ref,w) − (logπ_l − logπ_ref,l); rewards β·(logπ − logπ_ref)
    on SUMMED logps."""

    def __call__(self, chosen, rejected, ref_chosen, ref_rejected, *, chosen_lengths=None,
                 rejected_lengths=None, chosen_nll=None) -> tuple[Tensor, Tensor, Tensor]:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"the {self.name} loss needs reference log-probs")
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        losses = self.losses(chosen_ratio, rejected_ratio, chosen_lengths, rejected_lengths)
        return losses, (self.beta * chosen_ratio).detach(), (self.beta * rejected_ratio).detach()

    def logits(self, chosen_ratio: Tensor, rejected_ratio: Tensor) -> Tensor:
        return self.beta * (chosen_ratio - rejected_ratio)


class SigmoidLoss(_RatioLoss):
    """DPO: −log σ(βΔ); with ε = ``label_smoothing`` (cDPO): −(1−ε) log σ(βΔ) − ε log σ(−βΔ)."""

    name, smoothable = "sigmoid", True

    def losses(self, chosen_ratio, rejected_ratio, chosen_lengths, rejected_lengths) -> Tensor:
        return _smoothed_sigmoid_loss(self.logits(chosen_ratio, rejected_ratio), self.label_smoothing)


class RobustLoss(_RatioLoss):
    """Robust DPO: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε), ε < 0.5."""

    name, smoothable = "robust", True

    def losses(self, chosen_ratio, rejected_ratio, chosen_lengths, rejected_lengths) -> Tensor:
        return _robust_loss(self.logits(chosen_ratio, rejected_ratio), self.label_smoothing)


class HingeLoss(_RatioLoss):
    """SLiC: max(0, 1 − βΔ)."""

    name = "hinge"

    def losses(self, chosen_ratio, rejected_ratio, chosen_lengths, rejected_lengths) -> Tensor:
        return torch.relu(1 - self.logits(chosen_ratio, rejected_ratio))


class IPOLoss(_RatioLoss):
    """IPO: (Δ̄ − 1/(2β))², Δ̄ the same Δ with every logp divided by its response length (policy
    and reference of y_w by ``chosen_lengths``, of y_l by ``rejected_lengths``)."""

    name = "ipo"

    def losses(self, chosen_ratio, rejected_ratio, chosen_lengths, rejected_lengths) -> Tensor:
        delta = _normalised(chosen_ratio, chosen_lengths, self.name, "chosen") - _normalised(
            rejected_ratio, rejected_lengths, self.name, "rejected")
        return (delta - 1 / (2 * self.beta)) ** 2


class _AveragedLoss(DPOFamilyLoss):
    """Reference-free losses of the length-averaged policy logps ā = logp / length; rewards β·ā."""

    needs_reference = False

    def __call__(self, chosen, rejected, ref_chosen=None, ref_rejected=None, *, chosen_lengths=None,
                 rejected_lengths=None, chosen_nll=None) -> tuple[Tensor, Tensor, Tensor]:
        avg_w = _normalised(chosen, chosen_lengths, self.name, "chosen")
        avg_l = _normalised(rejected, rejected_lengths, self.name, "rejected")
        losses = self.losses(avg_w, avg_l, chosen_nll)
        return losses, (self.beta * avg_w).detach(), (self.beta * avg_l).detach()


class SimPOLoss(_AveragedLoss):
    """SimPO: −log σ(β·ā_w − β·ā_l − γ), γ = ``gamma``; ``label_smoothing`` as in cDPO."""

    name, smoothable, own_keys = "simpo", True, {"gamma": "simpo_gamma"}

    def __init__(self, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5) -> None:
        super().__init__(beta, label_smoothing)
        self.gamma = gamma

    def losses(self, avg_w: Tensor, avg_l: Tensor, chosen_nll: Tensor | None) -> Tensor:
        return _smoothed_sigmoid_loss(self.beta * (avg_w - avg_l) - self.gamma, self.label_smoothing)


class ORPOLoss(_AveragedLoss):
    """ORPO: NLL_w + λ·(−log σ(log odds_w − log odds_l)), odds = p/(1−p) with log p = ā (see
    :func:`log_odds`), NLL_w = ``chosen_nll`` [B] (per-token average NLL of y_w, with grad),
    λ = ``orpo_lambda``."""

    name, own_keys = "orpo", {"orpo_lambda": "orpo_lambda"}

    def __init__(self, beta: float, label_smoothing: float = 0.0, orpo_lambda: float = 0.1) -> None:
        super().__init__(beta, label_smoothing)
        self.orpo_lambda = orpo_lambda

    def losses(self, avg_w: Tensor, avg_l: Tensor, chosen_nll: Tensor | None) -> Tensor:
        if chosen_nll is None:
            raise ValueError("the orpo loss needs chosen_nll (per-token average NLL of y_w)")
        return chosen_nll - self.orpo_lambda * F.logsigmoid(log_odds(avg_w) - log_odds(avg_l))


class KTOLoss(DPOFamilyLoss):
    """KTO on unpaired completions: :func:`kto_loss` with β, λ_D and λ_U; called
    ``loss(policy_logps, ref_logps, labels, kl)`` -> losses [B]."""

    name, paired = "kto", False
    own_keys = {"desirable_weight": "kto_desirable_weight", "undesirable_weight": "kto_undesirable_weight"}

    def __init__(self, beta: float, label_smoothing: float = 0.0, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0) -> None:
        super().__init__(beta, label_smoothing)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def __call__(self, policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: float | Tensor) -> Tensor:
        return kto_loss(policy_logps, ref_logps, labels, kl, self.beta,
                        self.desirable_weight, self.undesirable_weight)


# `dpo.loss_type` -> its loss; the schema offers exactly these names (algorithms/catalog.py).
PREFERENCE_LOSSES: dict[str, type[DPOFamilyLoss]] = {
    cls.name: cls for cls in (SigmoidLoss, IPOLoss, HingeLoss, RobustLoss, SimPOLoss, ORPOLoss, KTOLoss)}


def preference_loss(cfg) -> DPOFamilyLoss:
    """The loss `cfg.loss_type` names (`cfg` a `dpo` recipe section), with its parameters."""
    if cfg.loss_type not in PREFERENCE_LOSSES:
        names = ", ".join(PREFERENCE_LOSSES)
        raise ValueError(f"unknown DPO loss_type {cfg.loss_type!r}; expected one of {names}")
    return PREFERENCE_LOSSES[cfg.loss_type].from_recipe(cfg)


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
