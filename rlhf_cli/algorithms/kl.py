"""Per-token KL estimators between the policy and the reference, and KL-coefficient controllers.

All estimators take per-token log-probs of the SAMPLED tokens (same shape, e.g. [B, T]) and
return that shape; they estimate KL(π ‖ π_ref) because the tokens were sampled from π.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOG_RATIO_CLAMP = 20.0


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logπ − logπ_ref (unbiased, high variance, can be negative)."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½·(logπ − logπ_ref)² (biased, low variance, ≥ 0)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (ρ − 1) − log ρ with ρ = π_ref/π = exp(logπ_ref − logπ) (unbiased, ≥ 0).

    Computed as expm1(l) − l with l = logπ_ref − logπ clamped to ±20 (no overflow).
    """
    log_rho = (ref_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.expm1(log_rho) - log_rho


# `ppo.kl_estimator` -> its estimator; the schema offers exactly these names (algorithms/catalog.py).
KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """The estimator named ``kind`` (a key of ``KL_ESTIMATORS``); same shape as the inputs."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logp, ref_logp)


# Rows per chunk in `exact_kl`: its float32 temporaries stay near 64 MiB each.
_KL_CHUNK_BYTES = 64 * 2**20


def exact_kl(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(logits/T) ‖ softmax(ref_logits/T)) of each row, summed over the whole vocabulary.

    The exact per-token KL of two next-token distributions (not an estimate from the sampled
    token). [N, V] -> [N], float32, a chunk of rows at a time. A token the policy gives
    probability 0 adds 0.
    """
    rows = max(1, _KL_CHUNK_BYTES // (4 * logits.shape[-1]))
    out = []
    for start in range(0, logits.shape[0], rows):
        logp = torch.log_softmax(logits[start:start + rows].float() / temperature, dim=-1)
        ref_logp = torch.log_softmax(ref_logits[start:start + rows].float() / temperature, dim=-1)
        p = logp.exp()
        out.append(torch.where(p > 0, p * (logp - ref_logp), torch.zeros_like(p)).sum(dim=-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


class _KLCoefficient:
    """The coefficient is the controller's whole state: checkpoints carry it (engine/runner.py)."""

    value: float

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController(_KLCoefficient):
    """Constant β; ``update`` is a no-op returning it."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController(_KLCoefficient):
    """Adaptive β (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon).

    ``current_kl``: the measured KL per sequence (sum over response tokens, averaged over the
    batch); ``n_steps``: the number of samples (sequences) that measurement covered.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
