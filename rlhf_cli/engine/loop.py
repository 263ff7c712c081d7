"""The one training loop shared by SFT, RM and DPO.

A stage supplies a `StageTask`: examples, a collate function, a loss that returns a SUM
over the batch, and the batch's weight (tokens for SFT, pairs for RM/DPO). The loop
divides by the weight of the whole global batch (all micro-batches, all processes), so
gradient accumulation and data parallelism give the same update as one big batch.

Faults: a step whose loss or gradients are NaN/inf is skipped (weights and optimizer state
untouched; the step still counts, so the data position and the schedule move on) and
counted in `skipped_steps`; `train.max_bad_steps` such steps in a row stop the run. Ctrl-C
finishes the current step, saves a checkpoint and stops (`TrainingInterrupted`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..schema import Recipe
from .batching import GlobalBatches
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .memory import memory_metrics
from .metrics import MetricsLogger, MetricWindow
from .optim import build_optimizer, build_scheduler
from .progress import TrainingProgress

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C handled: the message says what was saved and how to continue."""


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step; a second one stops
    at once, like an unhandled Ctrl-C (the last complete checkpoint is still intact)."""

    def __init__(self, announce: bool):
        self.requested, self.announce, self.previous = False, announce, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            # os.write, not print: a handler that writes to a stream the loop is writing to
            # would fail with "reentrant call".
            os.write(2, b"\nCtrl-C: stopping after this step to save a checkpoint "
                        b"(Ctrl-C again to stop at once)\n")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclass
class StageTask:
    model: torch.nn.Module
    train_examples: list
    collate: Callable[[list], dict]
    batch_weight: Callable[[dict], float]
    loss_fn: LossFn  # (model, batch) -> (summed loss, summed metrics)
    eval_examples: list | None = None
    # Extra evaluation on the unwrapped model, e.g. generation scored by a reward function.
    evaluate_extra: Callable[[torch.nn.Module], dict] | None = None
    save_final: Callable[[torch.nn.Module, Path], None] | None = None
    title: str = "train"
    weight_name: str = "tokens"  # what batch_weight counts, for the throughput metric
    extra_params: list = field(default_factory=list)
    # Turns the logged means into the reported metrics, e.g. ratios of two summed parts whose
    # denominators are not the batch weight (KTO's means over desirable examples only).
    finish_metrics: Callable[[dict], dict] | None = None


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, recipe: Recipe, task: StageTask, backend, run_dir: Path):
        self.recipe, self.task, self.backend = recipe, task, backend
        self.run_dir = Path(run_dir)
        train = recipe.train
        self.batches = GlobalBatches(
            len(task.train_examples), train.batch_size, train.grad_accum,
            backend.world_size, backend.rank, train.seed,
        )
        self.total_steps = self.batches.total_steps(train.epochs, train.max_steps)
        optimizer = build_optimizer(task.model.parameters(), train)
        self.model = backend.prepare(task.model, optimizer)
        self.scheduler = build_scheduler(backend.optimizer, train, self.total_steps)
        self.window = MetricWindow()
        self.logger = MetricsLogger(self.run_dir, backend.is_main, train.report_to)
        self.start_step = 0
        self.skipped_steps = 0  # NaN/inf steps over the whole run (resume included)
        self._bad_in_a_row = 0
        self._saved: tuple[int, Path] | None = None  # the newest checkpoint: (step, path)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return
        state = load_checkpoint(self.backend, checkpoint, self.scheduler)
        self.start_step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self._saved = (self.start_step, checkpoint)
        self.window.load(state.get("window", {}))
        self.logger.truncate_after(self.start_step)
        if self.backend.is_main:
            from .progress import console

            console.print(f"resuming from {checkpoint} (step {self.start_step})")

    # ------------------------------------------------------------------- steps
    def _global_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.backend.device)
        return self.backend.all_reduce_sum(tensor).tolist()

    def train_step(self, step: int) -> dict[str, float]:
        task, backend = self.task, self.backend
        micro = [task.collate([task.train_examples[i] for i in idx])
                 for idx in self.batches.micro_batches(step)]
        local_weight = sum(float(task.batch_weight(b)) for b in micro)
        (global_weight,) = self._global_sum([local_weight])
        self.model.train()
        loss_sum, metric_sums = 0.0, {}
        for i, batch in enumerate(micro):
            with backend.accumulating(i < len(micro) - 1), backend.autocast():
                loss, metrics = task.loss_fn(self.model, _to_device(batch, backend.device))
                # DDP/DeepSpeed average gradients over ranks; scale so the result is the
                # sum over the global batch divided by its weight.
                backend.backward(loss * backend.world_size / global_weight)
            loss_sum += float(loss.detach())
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        keys = sorted(metric_sums)
        # Summed before the optimizer step: every rank must agree on skipping it.
        totals = self._global_sum([loss_sum] + [metric_sums[k] for k in keys])
        bad_loss = not math.isfinite(totals[0])
        if bad_loss and backend.can_skip_steps:
            backend.skip_step()
            grad_norm = float("nan")
        else:
            grad_norm = backend.optimizer_step()
        lr = self.scheduler.get_last_lr()[0]
        # A skipped step still advances the schedule: lr stays a function of the step number,
        # as the data position does.
        self.scheduler.step()
        row = {"loss": totals[0] / global_weight, "lr": lr, "grad_norm": grad_norm}
        row.update({k: v / global_weight for k, v in zip(keys, totals[1:], strict=True)})
        row["_weight"] = global_weight
        row["_bad"] = bad_loss or backend.skipped_step
        return row

    def _count_bad_step(self, done: int, bad: bool) -> None:
        """Skip-and-count a NaN/inf step; stop when they come `train.max_bad_steps` in a row."""
        if not bad:
            self._bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        if self._bad_in_a_row < self.recipe.train.max_bad_steps and self.backend.can_skip_steps:
            return
        first = done - self._bad_in_a_row + 1
        steps = f"step {done}" if first == done else f"steps {first}-{done}"
        kept = (f"the newest checkpoint, {self._saved[1]}, is kept" if self._saved
                else "no checkpoint was saved")
        if not self.backend.can_skip_steps:  # DeepSpeed has already applied the update
            raise UserError(f"training diverged: the loss is NaN/inf at {steps}; lower train.lr "
                            f"or check the data; {kept}")
        raise UserError(
            f"training diverged: the loss or gradients were NaN/inf at {steps} "
            f"({self._bad_in_a_row} in a row, train.max_bad_steps={self.recipe.train.max_bad_steps}"
            f"; each was skipped); lower train.lr or check the data; {kept}")

    @torch.no_grad()
    def evaluate(self, step: int, log: bool = True) -> dict:
        task, backend = self.task, self.backend
        row: dict = {}
        if task.eval_examples:
            self.model.eval()
            size = self.recipe.train.eval_batch_size or self.recipe.train.batch_size
            shard = task.eval_examples[backend.rank::backend.world_size]
            # Every rank runs the same number of forwards: ZeRO-3 gathers weights
            # collectively, so a rank with one batch fewer would leave the others waiting.
            per_rank = -(-len(task.eval_examples) // backend.world_size)
            loss_sum, weight, metric_sums = 0.0, 0.0, {}
            for start in range(0, per_rank, size):
                chunk = shard[start:start + size]
                batch = task.collate(chunk or task.eval_examples[:1])
                with backend.autocast():
                    loss, metrics = task.loss_fn(self.model, _to_device(batch, backend.device))
                if not chunk:
                    continue  # a padding forward: its numbers are not counted
                loss_sum += float(loss)
                weight += float(task.batch_weight(batch))
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
            keys = sorted(metric_sums)
            totals = self._global_sum([loss_sum, weight] + [metric_sums[k] for k in keys])
            row["loss"] = totals[0] / max(totals[1], 1.0)
            row.update({k: v / max(totals[1], 1.0) for k, v in zip(keys, totals[2:], strict=True)})
            if task.finish_metrics is not None:
                row = task.finish_metrics(row)
        if task.evaluate_extra is not None:
            row.update(task.evaluate_extra(backend.unwrap(self.model)))
        if row:
            row = {"step": step, "split": "eval", **row}
            if log:
                self.logger.log(row)
        return row

    # -------------------------------------------------------------------- run
    def _log(self, step: int, progress: TrainingProgress):
        means = self.window.means()
        if self.task.finish_metrics is not None:
            means = self.task.finish_metrics(means)
        rate = self._window_weight / max(self._window_seconds, 1e-9)
        row = {"step": step, "epoch": round(self.batches.epoch_of(step), 4), **means,
               f"{self.task.weight_name}_per_sec": rate}
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        row.update(memory_metrics())
        self.logger.log(row)
        self.window.reset()
        self._window_weight, self._window_seconds = 0.0, 0.0
        rate = f"{self.task.weight_name}_per_sec"
        shown = {k: row[k] for k in ("loss", "lr", "grad_norm", rate, "skipped_steps") if k in row}
        progress.update(step, shown)
        progress.log_line(f"step {step}/{self.total_steps}  " + "  ".join(
            f"{k}={v:.4g}" for k, v in shown.items()))

    def _stop_if_asked(self, stop: _StopRequest, done: int) -> None:
        """After Ctrl-C (on any rank): save step `done` unless saved already, and stop."""
        (asked,) = self._global_sum([float(stop.requested)])
        if not asked:
            return
        if done == 0:
            raise TrainingInterrupted("stopped before the first step; nothing was saved")
        if self._saved is None or self._saved[0] != done:
            self.save(done)
        recipe_file = self.run_dir / "recipe.yaml"
        raise TrainingInterrupted(
            f"stopped at step {done}/{self.total_steps}; checkpoint saved in {self._saved[1]}. "
            f"To continue: rlhf {self.recipe.stage} --recipe {recipe_file} --resume")

    def run(self) -> dict:
        train = self.recipe.train
        is_main = self.backend.is_main
        progress = TrainingProgress(self.total_steps, self.start_step, is_main, self.task.title)
        # Throughput counts training time only (not evaluation or checkpointing), per log window.
        self._window_weight, self._window_seconds = 0.0, 0.0
        last_eval: dict = {}
        with _StopRequest(announce=is_main) as stop:
            try:
                if self.start_step == 0 and (train.eval_every or self.task.evaluate_extra):
                    last_eval = self.evaluate(0)
                for step in range(self.start_step, self.total_steps):
                    self._stop_if_asked(stop, step)
                    tic = time.perf_counter()
                    row = self.train_step(step)
                    self._window_seconds += time.perf_counter() - tic
                    self._window_weight += row.pop("_weight")
                    bad = row.pop("_bad")
                    if not bad:
                        self.window.add(row)
                    done = step + 1
                    self._count_bad_step(done, bad)
                    progress.update(done)
                    if done % train.log_every == 0 or done == self.total_steps:
                        self._log(done, progress)
                    if train.eval_every and done % train.eval_every == 0 and done < self.total_steps:
                        last_eval = self.evaluate(done)
                    if train.save_every and done % train.save_every == 0 and done < self.total_steps:
                        self.save(done)
                self._stop_if_asked(stop, self.total_steps)
                if train.eval_every or self.task.evaluate_extra:
                    last_eval = self.evaluate(self.total_steps)
            finally:
                progress.close()
                self.logger.close()
        return last_eval

    def save(self, step: int) -> Path:
        state = {"window": self.window.state(), "skipped_steps": self.skipped_steps,
                 "world_size": self.backend.world_size}
        path = save_checkpoint(self.backend, self.run_dir, step, state, self.scheduler,
                               self.recipe.train.keep_checkpoints)
        self._saved = (step, path)
        return path
