"""What stops a PPO run, and how: NaN/inf updates, a KL explosion, a bad reward.

A PPO update (one optimizer step on one minibatch) whose loss or gradient norm is NaN/inf
is skipped, as in the shared loop (engine/loop.py): the weights, the optimizer moments and
the actor EMA stay as they were, the schedule still moves on. Skipped updates are counted
(`bad_steps`); `train.max_bad_steps` of them in a row stop the run with an `error:` line
that names the newest checkpoint, which holds good weights. DeepSpeed applies the update
inside `backward`, so there the first NaN/inf loss stops the run before its backward.
"""

from __future__ import annotations

import math
from pathlib import Path

from ...errors import UserError

# Mean KL (nats per response) past which the policy has left the reference for good.
KL_LIMIT = 1000.0
ADVICE = "lower train.lr or raise ppo.kl_coef"


class BadUpdates:
    """Counts skipped updates; raises when `max_in_a_row` of them come in a row."""

    def __init__(self, max_in_a_row: int, can_skip: bool):
        self.max_in_a_row, self.can_skip = max_in_a_row, can_skip
        self.total = 0  # over the whole run, resume included
        self.in_a_row = 0
        self.checkpoint: Path | None = None  # the newest checkpoint, for the error line

    def record(self, bad: bool, iteration: int) -> None:
        """After each update of iteration `iteration` (1-based)."""
        if not bad:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.can_skip and self.in_a_row < self.max_in_a_row:
            return
        kept = (f"the newest checkpoint, {self.checkpoint}, is kept" if self.checkpoint
                else "no checkpoint was saved")
        if not self.can_skip:  # DeepSpeed: nothing was applied, but nothing can be skipped either
            raise UserError(f"PPO diverged: the loss is NaN/inf in iteration {iteration}; {ADVICE}; {kept}")
        raise UserError(
            f"PPO diverged: the loss or gradients were NaN/inf in {self.in_a_row} updates in a row, the "
            f"last in iteration {iteration} (train.max_bad_steps={self.max_in_a_row}; each was skipped); "
            f"{ADVICE}; {kept}")

    def state(self) -> dict:
        return {"bad_steps": self.total, "bad_in_a_row": self.in_a_row}

    def load(self, state: dict) -> None:
        self.total = state.get("bad_steps", 0)
        self.in_a_row = state.get("bad_in_a_row", 0)


def check_scores(non_finite: float, iteration: int) -> None:
    """A NaN/inf reward is a broken reward model or function, not a transient: stop at once.
    `non_finite`: how many scores were NaN/inf, summed over all processes."""
    if non_finite:
        raise UserError(f"PPO stopped at iteration {iteration}: the reward is NaN/inf for "
                        f"{int(non_finite)} responses; check ppo.reward_model or ppo.reward_fn; "
                        "the last good checkpoint is kept")


def check_kl(kl: float, iteration: int) -> None:
    if not math.isfinite(kl) or kl > KL_LIMIT:
        what = "became NaN/inf" if not math.isfinite(kl) else f"exploded ({kl:.1f})"
        raise UserError(f"PPO stopped at iteration {iteration}: KL to the reference {what}; {ADVICE}; "
                        "the last good checkpoint is kept")
