"""What a stage hands the runner (runner.py): its step, its evaluation and its state.

SFT, RM, DPO and KTO build theirs with `loop.Trainer` (a loss on batches of examples); PPO
with its iteration (stages/ppo/run.py). The runner owns everything around them: Ctrl-C,
the NaN/inf policy's counter, eval/save cadence, checkpoints, resume, progress, metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .bad_steps import BadSteps


class Stateful(Protocol):
    """Anything a checkpoint must carry besides model, optimizer, schedule and RNG."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class StageParts:
    title: str  # of the progress bar
    unit: str  # what one step is called in messages: "step", "iteration"
    total_steps: int
    scheduler: Any  # checkpointed with the model and optimizer
    # Runs step `index` (0-based); returns the metrics row to log after it, or None.
    step: Callable[[int], dict | None]
    # The evaluation row at step `step` ("step" and "split" included), {} when there is none.
    evaluate: Callable[[int], dict]
    # The stage's NaN/inf counter: its step records every optimizer step in it.
    bad_steps: BadSteps
    # The keys of a logged row that the progress bar and the log line show.
    shown: tuple[str, ...] = ()
    # Evaluate before the first and after the last step even without `train.eval_every`.
    evaluates_at_ends: bool = False
    # Extra state in every checkpoint, by name (KL coefficient, EMA, metric window, ...).
    state: dict[str, Stateful] = field(default_factory=dict)
    # Called after a resume from step N, e.g. to cut a side file back to step N.
    resumed: Callable[[int], None] | None = None
