"""Rejection-sampling fine-tuning in rounds, as in Llama 2 (§3.2.3) and RAFT (Dong et al. 2023):

    for each round: sample K responses per prompt from the current policy -> score them with
    the judge -> keep some (`rft.select`) -> SFT on the kept ones (train.* as `rlhf sft`)

One runner step (engine/runner.py) is one SFT optimizer step; the first step of a round
samples, scores and selects before it trains, and logs the round's figures with its own.
Every round has the same number of steps (`train.max_steps`, or `train.epochs` over the
kept samples where `rft.select` fixes their number), so the schedule spans the whole run.
Checkpoints carry the round's kept samples (a named part), so `--resume` mid-round trains on
the same samples; prompts and batches are functions of the round and step numbers.
Several processes: each rank samples and scores an equal share of the round's prompts, the
shares are gathered (round.py: sample_round) so that every rank selects the same samples from
the whole round, and the round's SFT steps are data-parallel like `rlhf sft`'s.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

from ...data.collate import pad_batch
from ...data.loaders import load_prompts
from ...engine.bad_steps import BadSteps
from ...engine.batching import GlobalBatches
from ...engine.final_model import save_final_model
from ...engine.judge import make_judge
from ...engine.loop import StageData, diverged
from ...engine.memory import memory_metrics
from ...engine.metrics import MetricWindow
from ...engine.optim import build_optimizer, build_scheduler
from ...engine.progress import say
from ...engine.rollout import seed_sampling_stream
from ...engine.run_dir import FINAL
from ...engine.runner import finish_run, run_stage
from ...engine.scoring import policy_scorer
from ...engine.stage import StageParts
from ...engine.train_step import train_step
from ...errors import UserError
from ...models.policy import policy_model, tokenizer_for
from ...models.sft_objective import SFTObjective, sft_loss, trained_tokens
from ...schema import Recipe
from .round import kept_indices, round_metrics, sample_round
from .rounds import KeptSamples, RoundFiles, kept_example


def steps_per_round(recipe: Recipe) -> int:
    train, kept, launch = recipe.train, recipe.rft.kept_per_round(), recipe.launch
    if train.max_steps is not None:
        return train.max_steps
    global_batch = train.batch_size * train.grad_accum * launch.num_processes * launch.num_machines
    return max(1, math.ceil(train.epochs * (kept // global_batch)))


class RFT:
    def __init__(self, recipe: Recipe, run_dir: Path, backend):
        self.recipe, self.rft, self.train, self.backend = recipe, recipe.rft, recipe.train, backend
        self.tokenizer = tokenizer_for(recipe)
        self.prompts = load_prompts(recipe, self.tokenizer, backend, section="rft")
        if len(self.prompts) < self.rft.prompts_per_round:
            raise UserError(f"{len(self.prompts)} prompts, fewer than rft.prompts_per_round "
                            f"({self.rft.prompts_per_round})", where="data.train")
        lm = policy_model(recipe, announce=backend.is_main)
        # An RM trained on this base rides on the policy as a frozen adapter (no second base);
        # frozen, it stays out of the optimizer, and final/ saves the policy's adapter only.
        self.judge = make_judge(self.rft.reward_fn, self.rft.reward_model, key_prefix="rft",
                                model_section=recipe.model, tokenizer=self.tokenizer, policy=lm)
        objective = SFTObjective(lm)
        self.model = backend.prepare(objective, build_optimizer(objective.parameters(), self.train))
        self.prompt_batches = GlobalBatches(len(self.prompts), self.rft.prompts_per_round, 1, 1, 0,
                                            self.train.seed)
        self.steps_per_round = steps_per_round(recipe)
        self.total_steps = self.rft.rounds * self.steps_per_round
        self.scheduler = build_scheduler(backend.optimizer, self.train, self.total_steps)
        self.kept, self.files = KeptSamples(), RoundFiles(run_dir, backend.is_main)
        self.window = MetricWindow()
        self.bad_steps = BadSteps(self.train.max_bad_steps, backend.can_skip_steps, diverged)
        self.scorer = policy_scorer(recipe, self.tokenizer, backend)
        if backend.world_size > 1:
            # A stream of its own per rank (one process keeps the run's seed, and its figures).
            seed_sampling_stream(self.train.seed, backend.rank)
        self._round_data: tuple[int, StageData, GlobalBatches] | None = None
        self._seconds = 0.0  # training seconds since the last row

    def parts(self) -> StageParts:
        return StageParts(
            title="rft", unit="step", total_steps=self.total_steps, scheduler=self.scheduler,
            step=self.step, evaluate=self.evaluate, bad_steps=self.bad_steps,
            shown=("round", "score", "kept_share", "loss", "lr"),
            evaluates_at_ends=self.scorer is not None,
            state={"kept": self.kept, "window": self.window}, resumed=self.resumed)

    def resumed(self, step: int) -> None:
        self.files.remove_after(rounds_started=-(-step // self.steps_per_round))

    # ---------------------------------------------------------------------- one step
    def step(self, index: int) -> dict | None:
        round_index, position = divmod(index, self.steps_per_round)
        round_row = self.new_round(round_index) if position == 0 else {}
        tic = time.perf_counter()
        trained = self.train_on_kept(round_index, position)
        self._seconds += time.perf_counter() - tic
        done = index + 1
        if trained is not None:
            trained.pop("_weight")
            bad = trained.pop("_bad")
            if not bad:
                self.window.add(trained)
            self.bad_steps.record(bad, done)
        if round_row or done % self.train.log_every == 0 or done == self.total_steps:
            return {"step": done, "round": round_index + 1, **round_row, **self._window_row()}
        return None

    def new_round(self, round_index: int) -> dict:
        """Sample, score and select the round's examples; the round's figures."""
        tic = time.perf_counter()
        prompts = [self.prompts[i] for i in self.prompt_batches.micro_batches(round_index)[0]]
        lm = self.backend.unwrap(self.model).lm
        samples = sample_round(lm, prompts, self.tokenizer, self.rft, self.judge, self.backend)
        kept = kept_indices(samples, self.rft)
        self.kept.set(round_index, [kept_example(samples.examples[i]["prompt_input_ids"],
                                                 samples.response_ids[i]) for i in kept])
        self.files.write(round_index, [{"prompt": samples.examples[i]["prompt"],
                                        "response": samples.responses[i], "score": samples.scores[i]}
                                       for i in kept])
        if not kept:
            say(self.backend, f"round {round_index + 1} kept no sample: its {self.steps_per_round} steps "
                              "train nothing")
        return {**round_metrics(samples, kept), "time_sample": time.perf_counter() - tic}

    def _data(self, round_index: int) -> tuple[StageData, GlobalBatches]:
        """The round's kept examples as SFT data; a round that kept fewer than one batch repeats
        them to fill it (each as often as the others)."""
        if self._round_data is None or self._round_data[0] != round_index:
            examples, train, world = self.kept.examples, self.train, self.backend.world_size
            size = train.batch_size * train.grad_accum * world
            pool = examples * -(-size // len(examples))
            data = StageData(train_examples=pool, batch_weight=trained_tokens, loss_fn=sft_loss,
                             collate=partial(pad_batch, pad_token_id=self.tokenizer.pad_token_id))
            # A different order each round, fixed by the seed and the round number.
            batches = GlobalBatches(len(pool), train.batch_size, train.grad_accum, world,
                                    self.backend.rank, train.seed + 7919 * (round_index + 1))
            self._round_data = (round_index, data, batches)
        return self._round_data[1], self._round_data[2]

    def train_on_kept(self, round_index: int, position: int) -> dict | None:
        """One SFT optimizer step on the round's kept samples; None (the schedule still moves
        on) when the round kept none."""
        if not self.kept.examples:
            self.scheduler.step()
            return None
        data, batches = self._data(round_index)
        return train_step(self.model, data, batches.micro_batches(position), self.backend, self.scheduler)

    def _window_row(self) -> dict:
        # Seconds, not tokens/s: "time_" figures are the machine's, left out when a resumed
        # run is compared with an uninterrupted one.
        row = {**self.window.means(), "time_train": self._seconds}
        if self.bad_steps.total:
            row["skipped_steps"] = self.bad_steps.total
        row.update(memory_metrics())
        self.window.reset()
        self._seconds = 0.0
        return row

    def evaluate(self, step: int) -> dict:
        if self.scorer is None:
            return {}
        return {"step": step, "split": "eval", **self.scorer(self.backend.unwrap(self.model))}


def run_rft(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    rft = RFT(recipe, run_dir, backend)
    last_eval = run_stage(recipe, backend, run_dir, rft.parts(), resume)
    final = save_final_model(backend, rft.model, lambda m: m.lm, rft.tokenizer, Path(run_dir) / FINAL)
    return finish_run(backend, run_dir, final, last_eval)
