"""The step and evaluation of the loss-based stages: SFT, RM, DPO, KTO.

A stage supplies a `StageTask`: examples, a collate function, a loss that returns a SUM
over the batch, and the batch's weight (tokens for SFT, pairs for RM/DPO). A step divides
by the weight of the whole global batch (all micro-batches, all processes), so gradient
accumulation and data parallelism give the same update as one big batch. `Trainer.parts()`
hands the step and the evaluation to the runner (runner.py): Ctrl-C, cadence, checkpoints,
resume.

Faults: a step whose loss or gradients are NaN/inf is skipped (weights and optimizer state
untouched; the step still counts, so the data position and the schedule move on) and
counted in `skipped_steps`; `train.max_bad_steps` such steps in a row stop the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..schema import Recipe
from .bad_steps import BadSteps
from .batching import GlobalBatches
from .evaluation import evaluate_loss
from .memory import memory_metrics
from .metrics import MetricWindow
from .optim import build_optimizer, build_scheduler
from .stage import StageParts
from .train_step import train_step

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StageData:
    """A loss-based stage's examples and how they become a loss."""

    train_examples: list
    collate: Callable[[list], dict]
    batch_weight: Callable[[dict], float]
    loss_fn: LossFn  # (model, batch) -> (summed loss, summed metrics)
    eval_examples: list | None = None
    weight_name: str = "tokens"  # what batch_weight counts, for the throughput metric
    # Turns the logged means into the reported metrics, e.g. ratios of two summed parts whose
    # denominators are not the batch weight (KTO's means over desirable examples only).
    finish_metrics: Callable[[dict], dict] | None = None


@dataclass
class StageTask:
    model: torch.nn.Module
    data: StageData
    # Extra evaluation on the unwrapped model, e.g. generation scored by a reward function.
    evaluate_extra: Callable[[torch.nn.Module], dict] | None = None
    title: str = "train"


def diverged(bad: BadSteps, done: int) -> str:
    """The error line once NaN/inf steps stop a loss-based run at step `done`."""
    first = done - bad.in_a_row + 1
    steps = f"step {done}" if first == done else f"steps {first}-{done}"
    if not bad.can_skip:  # DeepSpeed has already applied the update
        return (f"training diverged: the loss is NaN/inf at {steps}; lower train.lr or check the data; "
                f"{bad.kept()}")
    return (f"training diverged: the loss or gradients were NaN/inf at {steps} ({bad.in_a_row} in a row, "
            f"train.max_bad_steps={bad.max_in_a_row}; each was skipped); lower train.lr or check the data; "
            f"{bad.kept()}")


class Trainer:
    def __init__(self, recipe: Recipe, task: StageTask, backend):
        self.recipe, self.task, self.data, self.backend = recipe, task, task.data, backend
        train = recipe.train
        self.batches = GlobalBatches(len(self.data.train_examples), train.batch_size, train.grad_accum,
                                     backend.world_size, backend.rank, train.seed, what="training examples",
                                     keys="train.batch_size or train.grad_accum")
        self.total_steps = self.batches.total_steps(train.epochs, train.max_steps)
        optimizer = build_optimizer(task.model.parameters(), train)
        self.model = backend.prepare(task.model, optimizer)
        self.scheduler = build_scheduler(backend.optimizer, train, self.total_steps)
        self.window = MetricWindow()
        self.bad_steps = BadSteps(train.max_bad_steps, backend.can_skip_steps, diverged)
        # Throughput counts training time only (not evaluation or checkpointing), per log window.
        self._window_weight, self._window_seconds = 0.0, 0.0

    def parts(self) -> StageParts:
        rate = f"{self.data.weight_name}_per_sec"
        return StageParts(
            title=self.task.title, unit="step", total_steps=self.total_steps, scheduler=self.scheduler,
            step=self.step, evaluate=self.evaluate, bad_steps=self.bad_steps,
            shown=("loss", "lr", "grad_norm", rate, "skipped_steps"),
            evaluates_at_ends=self.task.evaluate_extra is not None, state={"window": self.window})

    def step(self, index: int) -> dict | None:
        """One optimizer step (or a skipped one); the window's row at a log step."""
        tic = time.perf_counter()
        row = train_step(self.model, self.data, self.batches.micro_batches(index), self.backend,
                         self.scheduler)
        self._window_seconds += time.perf_counter() - tic
        self._window_weight += row.pop("_weight")
        bad = row.pop("_bad")
        if not bad:
            self.window.add(row)
        done = index + 1
        self.bad_steps.record(bad, done)
        if done % self.recipe.train.log_every == 0 or done == self.total_steps:
            return self._window_row(done)
        return None

    def _window_row(self, step: int) -> dict:
        means = self.window.means()
        if self.data.finish_metrics is not None:
            means = self.data.finish_metrics(means)
        rate = self._window_weight / max(self._window_seconds, 1e-9)
        row = {"step": step, "epoch": round(self.batches.epoch_of(step), 4), **means,
               f"{self.data.weight_name}_per_sec": rate}
        if self.bad_steps.total:
            row["skipped_steps"] = self.bad_steps.total
        row.update(memory_metrics())
        self.window.reset()
        self._window_weight, self._window_seconds = 0.0, 0.0
        return row

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """The evaluation row at `step` (not logged: the runner logs it), {} without evaluation."""
        row: dict = {}
        if self.data.eval_examples:
            size = self.recipe.train.eval_batch_size or self.recipe.train.batch_size
            row = evaluate_loss(self.model, self.data, size, self.backend)
        if self.task.evaluate_extra is not None:
            row.update(self.task.evaluate_extra(self.backend.unwrap(self.model)))
        return {"step": step, "split": "eval", **row} if row else {}
