"""The NaN/inf policy of every stage: skip a bad optimizer step, count it, stop after too many.

A step whose loss or gradients are NaN/inf is skipped by the stage's step (weights and
optimizer moments untouched, the schedule moves on) and recorded here. `max_in_a_row` of
them in a row stop the run with an `error:` line that names the newest checkpoint (it holds
good weights). DeepSpeed applies an update inside its backward, so a backend that cannot
skip stops at the first one. The counts are checkpointed (`state_dict`), so a resumed run
counts on as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError


class BadSteps:
    """`describe(self, position)`: the stage's words for the error once the run must stop
    (`position`: where the last bad step happened, in the stage's own counting)."""

    def __init__(self, max_in_a_row: int, can_skip: bool, describe: Callable[[BadSteps, int], str]):
        self.max_in_a_row, self.can_skip, self.describe = max_in_a_row, can_skip, describe
        self.total = 0  # over the whole run, resume included
        self.in_a_row = 0
        self.checkpoint: Path | None = None  # the newest checkpoint (the runner keeps it current)

    def record(self, bad: bool, position: int) -> None:
        """After each optimizer step, taken or skipped; raises `UserError` to stop the run."""
        if not bad:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.can_skip and self.in_a_row < self.max_in_a_row:
            return
        raise UserError(self.describe(self, position))

    def kept(self) -> str:
        return (f"the newest checkpoint, {self.checkpoint}, is kept" if self.checkpoint
                else "no checkpoint was saved")

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = state["total"], state["in_a_row"]
