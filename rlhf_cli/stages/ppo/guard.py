"""What stops a PPO run, and how: NaN/inf updates, a KL explosion, a bad reward.

A PPO update (one optimizer step on one minibatch) whose loss or gradient norm is NaN/inf
is skipped and counted by the runner's NaN/inf policy (engine/bad_steps.py), as every
stage's steps are: the weights, the optimizer moments and the actor EMA stay as they were,
the schedule still moves on; `train.max_bad_steps` in a row stop the run with the error
line below. A NaN/inf reward or an exploding KL stops the run at once.
"""

from __future__ import annotations

import math

from ...engine.bad_steps import BadSteps
from ...errors import UserError

# Mean KL (nats per response) past which the policy has left the reference for good.
KL_LIMIT = 1000.0
ADVICE = "lower train.lr or raise ppo.kl_coef"


def diverged(bad: BadSteps, iteration: int) -> str:
    """The error line once NaN/inf updates stop the run (in iteration `iteration`, 1-based)."""
    if not bad.can_skip:  # DeepSpeed: nothing was applied, but nothing can be skipped either
        return f"PPO diverged: the loss is NaN/inf in iteration {iteration}; {ADVICE}; {bad.kept()}"
    return (f"PPO diverged: the loss or gradients were NaN/inf in {bad.in_a_row} updates in a row, the "
            f"last in iteration {iteration} (train.max_bad_steps={bad.max_in_a_row}; each was skipped); "
            f"{ADVICE}; {bad.kept()}")


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
