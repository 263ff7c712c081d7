"""PPO-max's reward scaling and normalisation by running (historical) moments.

`ppo.reward_scaling` divides each score by the running std of every score seen so far,
`ppo.reward_centering` subtracts their running mean (both on: the paper's
"reward normalisation", r̃ = (r − μ)/σ). The moments include this iteration's batch, summed
over all processes, so every rank scales by the same numbers; they are a named stateful part
of the run (stages/ppo/run.py `parts`), kept in every checkpoint, so `--resume` scales as
an uninterrupted run does. `ppo.reward_clip` then clips the result (stages/ppo/experience.py).
"""

from __future__ import annotations

import torch

from ...algorithms.running import RunningMoments
from ...engine.reduce import global_sums
from ...schema import PPOSection

# A batch whose scores were all the same leaves the std at 0: never divide by less than this.
MIN_STD = 1e-6


class RunningRewards:
    def __init__(self, ppo: PPOSection, backend):
        self.center, self.scale, self.backend = ppo.reward_centering, ppo.reward_scaling, backend
        self.moments = RunningMoments()

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores [B] centred and/or scaled by the running moments, this batch included."""
        values = scores.detach().double()
        sums = global_sums(self.backend, {"sum": float(values.sum()), "count": float(values.numel()),
                                          "sum_sq": float((values * values).sum())})
        self.moments.update((sums["sum"], sums["sum_sq"], sums["count"]))
        out = values - self.moments.mean if self.center else values
        if self.scale:
            out = out / max(self.moments.std, MIN_STD)
        return out.to(scores.dtype)

    def stats(self) -> dict:
        """For the iteration's log row."""
        return {"reward_running_mean": self.moments.mean, "reward_running_std": self.moments.std}

    def state_dict(self) -> dict:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state)
