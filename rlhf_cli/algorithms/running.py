"""Running (historical) moments of a stream of scalars, for PPO-max's reward scaling.

The state is (n, mean, M2) with M2 = Σ (x − mean)² over everything seen so far. A batch comes
in as its sums ``(Σ x, Σ x², n)`` (``masked.masked_moments``, summed over processes first), is
turned into its own (n_b, mean_b, M2_b) and merged by Chan et al.'s parallel formula:

    n' = n + n_b,  δ = mean_b − mean,  mean' = mean + δ·n_b/n',  M2' = M2 + M2_b + δ²·n·n_b/n'

which equals the moments of the concatenated stream (Welford's update is the n_b = 1 case).
The std is the unbiased one, sqrt(M2/(n − 1)), as MOSS-RLHF's running moments report it.
"""

from __future__ import annotations

import math

from rlhf_cli.algorithms.masked import Moments


def batch_moments(sums: Moments) -> tuple[float, float, float]:
    """(n, mean, M2) of a batch from its sums (Σ x, Σ x², n), in float64."""
    total, total_sq, count = (float(s) for s in sums)
    if count <= 0:
        return 0.0, 0.0, 0.0
    mean = total / count
    return count, mean, max(total_sq - total * mean, 0.0)  # rounding can go just below 0


def combine(a: tuple[float, float, float], b: tuple[float, float, float]) -> tuple[float, float, float]:
    """Chan's merge of two (n, mean, M2): the moments of both streams together."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if n == 0:
        return 0.0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


class RunningMoments:
    """Count, mean and M2 of every value seen; `update` merges a batch's summed moments.

    Until two values have been seen the std is 1 (nothing to scale by yet); a checkpoint
    carries the three numbers (`state_dict`), so a resumed run scales as an uninterrupted one.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, sums: Moments) -> None:
        self.count, self.mean, self.m2 = combine((self.count, self.mean, self.m2), batch_moments(sums))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count >= 2 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
