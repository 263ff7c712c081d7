"""The one runner of every stage: the cadence around a stage's step (engine/stage.py).

Per step: stop if Ctrl-C was pressed (on any process; the step just finished is saved
first), run the step, log its row, evaluate and save on the recipe's cadence. Checkpoints
hold the model, optimizer, schedule, each process's RNG, the NaN/inf counter and every
stateful part the stage hands in; `--resume` continues exactly where the checkpoint was
taken. The stage's step applies the NaN/inf policy through the counter (bad_steps.py).
"""

from __future__ import annotations

from pathlib import Path

from ..schema import Recipe
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .metrics import MetricsLogger
from .plots import plot_run
from .progress import TrainingProgress, console, say
from .reduce import global_sums
from .stage import StageParts
from .stop import StopRequest, TrainingInterrupted

BAD_STEPS = "bad_steps"


class Runner:
    def __init__(self, recipe: Recipe, backend, run_dir: Path, parts: StageParts):
        self.recipe, self.backend, self.run_dir, self.parts = recipe, backend, Path(run_dir), parts
        self.logger = MetricsLogger(self.run_dir, backend.is_main, recipe.train.report_to)
        self.state = {BAD_STEPS: parts.bad_steps, **parts.state}
        self.start = 0
        self._saved: tuple[int, Path] | None = None  # the newest checkpoint: (step, path)

    # ------------------------------------------------------------ checkpoints, resume
    def save(self, step: int) -> Path:
        path = save_checkpoint(self.backend, self.run_dir, step, {"world_size": self.backend.world_size},
                               self.parts.scheduler, self.recipe.train.keep_checkpoints, self.state)
        self._newest(step, path)
        return path

    def _newest(self, step: int, path: Path) -> None:
        self._saved = (step, path)
        self.parts.bad_steps.checkpoint = path

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return
        self.start = load_checkpoint(self.backend, checkpoint, self.parts.scheduler, self.state)["step"]
        self._newest(self.start, checkpoint)
        self.logger.truncate_after(self.start)
        if self.parts.resumed is not None:
            self.parts.resumed(self.start)
        if self.backend.is_main:
            console.print(f"resuming from {checkpoint} ({self.parts.unit} {self.start})", highlight=False)

    def _stop_if_asked(self, stop: StopRequest, done: int) -> None:
        """After Ctrl-C (on any rank): save step `done` unless saved already, and stop."""
        if not global_sums(self.backend, {"asked": float(stop.requested)})["asked"]:
            return
        unit, total = self.parts.unit, self.parts.total_steps
        if done == 0:
            raise TrainingInterrupted(f"stopped before the first {unit}; nothing was saved")
        if self._saved is None or self._saved[0] != done:
            self.save(done)
        raise TrainingInterrupted(
            f"stopped at {unit} {done}/{total}; checkpoint saved in {self._saved[1]}. "
            f"To continue: rlhf {self.recipe.stage} --recipe {self.run_dir / 'recipe.yaml'} --resume")

    # ------------------------------------------------------------------------- run
    def _evaluate(self, step: int) -> dict:
        row = self.parts.evaluate(step)
        if row:
            self.logger.log(row)
        return row

    def _report(self, progress: TrainingProgress, row: dict | None, done: int) -> None:
        if row is None:
            progress.update(done)
            return
        self.logger.log(row)
        shown = {k: row[k] for k in self.parts.shown if k in row}
        progress.update(done, shown)
        if done % self.recipe.train.log_every == 0 or done == self.parts.total_steps:
            progress.log_line(f"{self.parts.unit} {done}/{self.parts.total_steps}  " + "  ".join(
                f"{k}={v:.4g}" for k, v in shown.items()))

    def _steps(self, stop: StopRequest, progress: TrainingProgress) -> dict:
        """The steps from `start` on, with their cadence; the newest evaluation row."""
        train, total, last_eval = self.recipe.train, self.parts.total_steps, {}
        for index in range(self.start, total):
            self._stop_if_asked(stop, index)
            row = self.parts.step(index)
            done = index + 1
            self._report(progress, row, done)
            if train.eval_every and done % train.eval_every == 0 and done < total:
                last_eval = self._evaluate(done)
            if train.save_every and done % train.save_every == 0 and done < total:
                self.save(done)
        self._stop_if_asked(stop, total)
        return last_eval

    def run(self) -> dict:
        """All steps; the last evaluation row ({} without evaluation)."""
        parts, at_ends = self.parts, bool(self.recipe.train.eval_every or self.parts.evaluates_at_ends)
        progress = TrainingProgress(parts.total_steps, self.start, self.backend.is_main, parts.title)
        with StopRequest(announce=self.backend.is_main) as stop:
            try:
                first = self._evaluate(0) if at_ends and self.start == 0 else {}
                last_eval = self._steps(stop, progress) or first
                if at_ends:
                    last_eval = self._evaluate(parts.total_steps) or last_eval
            finally:
                progress.close()
                self.logger.close()
        return last_eval


def run_stage(recipe: Recipe, backend, run_dir: Path, parts: StageParts, resume: bool = False) -> dict:
    """How every stage runs: its parts on the runner, from the newest checkpoint with `resume`;
    the last evaluation row."""
    runner = Runner(recipe, backend, run_dir, parts)
    if resume:
        runner.resume()
    return runner.run()


def finish_run(backend, run_dir: Path, final: Path, last_eval: dict) -> dict:
    """After final/ is written: the curves, one line saying where both are, and the run's
    summary for run.json (the last evaluation's numbers)."""
    if backend.is_main:
        plot = plot_run(run_dir)
        say(backend, f"saved {final}" + (f"; curves in {plot}" if plot else ""))
    return {k: v for k, v in last_eval.items() if k not in ("step", "split")}
