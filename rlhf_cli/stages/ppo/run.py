"""PPO, one iteration at a time: rollout -> score -> advantages -> K epochs of updates.

Reuses the engine's optimiser, schedule, checkpoints, metrics, progress and Ctrl-C parts;
the arrangement (roles.py) decides where actor, critic, reference and reward live, and
guard.py what stops a run. Ctrl-C finishes the current iteration, saves a checkpoint and
exits 130, as the shared loop does; `--resume` continues a run exactly (model, optimizer,
schedule, RNG, KL coefficient, skipped-update count and actor EMA are in the checkpoint;
prompts and ptx batches are functions of the iteration and update numbers).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from ...algorithms.kl import AdaptiveKLController, FixedKLController
from ...data.loaders import load_prompts
from ...engine.batching import GlobalBatches
from ...engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ...engine.loop import TrainingInterrupted, _StopRequest
from ...engine.memory import memory_metrics, release_freed_memory
from ...engine.metrics import MetricsLogger
from ...engine.optim import build_scheduler
from ...engine.plots import plot_run
from ...engine.progress import TrainingProgress, say
from ...engine.run_dir import FINAL
from ...engine.scoring import make_task_scorer
from ...models.arrangement_build import build_arrangement
from ...models.policy import tokenizer_for
from ...rewards import load_reward_fn
from ...schema import Recipe
from .ema import ActorEMA
from .experience import build_experience, zero_std_share
from .guard import BadUpdates, check_kl, check_scores
from .optim import ppo_optimizer
from .ptx import PtxBatches
from .rollout import decode_responses, sample
from .saving import WithPPOState, save_ppo_final
from .update import ppo_update

SAMPLES = "samples.jsonl"
# Not the run's seed itself: that one already drew the initial weights.
SAMPLING_SEED_OFFSET = 1


def _reward_stats(recipe: Recipe) -> dict | None:
    if not recipe.ppo.reward_model:
        return None
    for candidate in (Path(recipe.ppo.reward_model) / FINAL, Path(recipe.ppo.reward_model)):
        if (candidate / "reward_stats.json").is_file():
            return json.loads((candidate / "reward_stats.json").read_text())
    return None


def seed_sampling_stream(seed: int, rank: int) -> None:
    """Seed the random stream the rollouts are sampled from, once the models are built.

    Building draws from the global generator as much as the arrangement and the reward
    source need (fresh LoRA weights, a critic's head), so seeding after it makes one seed
    sample the same rollouts whatever was built. Each process gets a stream of its own:
    identical streams would sample correlated rollouts on every rank. A checkpoint keeps
    each rank's state (rng-rank{N}.pt), restored after this on --resume.
    """
    torch.manual_seed(seed + SAMPLING_SEED_OFFSET + 1_000_003 * rank)


class PPORun:
    def __init__(self, recipe: Recipe, run_dir: Path, backend):
        self.recipe, self.run_dir, self.backend = recipe, Path(run_dir), backend
        self.ppo, self.train = recipe.ppo, recipe.train
        self.tokenizer = tokenizer_for(recipe)
        self.prompts = load_prompts(recipe, self.tokenizer, backend)
        self.ptx = PtxBatches(recipe, self.tokenizer, backend) if self.ppo.ptx_coef > 0 else None
        self.reward_fn = load_reward_fn(self.ppo.reward_fn) if self.ppo.reward_fn else None
        if self.reward_fn is not None and self.ppo.reward_model:
            say(backend, "scores come from ppo.reward_fn; ppo.reward_model only initialises the critic")
        # The RM's mean/std normalise the RM's own scores, never a reward function's.
        self.reward_stats = _reward_stats(recipe) if self.reward_fn is None else None
        if self.ppo.normalize_reward and self.reward_fn is None and self.reward_stats is None:
            say(backend, "ppo.normalize_reward: the reward model has no reward_stats.json; "
                         "scores are used as they are")
        arrangement = build_arrangement(recipe, self.tokenizer, announce=backend.is_main)
        self.wrapped = backend.prepare(arrangement, ppo_optimizer(arrangement, recipe))
        self.model = backend.unwrap(self.wrapped)
        seed_sampling_stream(self.train.seed, backend.rank)
        self.ema = ActorEMA(self.model, self.ppo.ema_decay) if self.ppo.ema_decay else None
        # rollout_batch_size prompts per process, each sampled samples_per_prompt times.
        self.batches = GlobalBatches(len(self.prompts), self.ppo.rollout_batch_size, 1,
                                     backend.world_size, backend.rank, self.train.seed)
        self.iterations = self.batches.total_steps(self.train.epochs, self.train.max_steps)
        responses = self.ppo.rollout_batch_size * self.ppo.samples_per_prompt
        self.updates = self.ppo.ppo_epochs * math.ceil(responses / self.ppo.mini_batch_size)
        self.scheduler = build_scheduler(backend.optimizer, self.train, self.iterations * self.updates)
        self.kl = (AdaptiveKLController(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
                   if self.ppo.adaptive_kl else FixedKLController(self.ppo.kl_coef))
        self.logger = MetricsLogger(self.run_dir, backend.is_main, self.train.report_to)
        self.guard = BadUpdates(self.train.max_bad_steps, backend.can_skip_steps)
        self.start = 0
        self._saved: tuple[int, Path] | None = None  # the newest checkpoint: (iteration, path)
        self.scorer = None
        if self.train.eval_reward_fn:
            self.scorer = make_task_scorer(recipe, self.tokenizer, backend)

    # ---------------------------------------------------------------- one iteration
    def _scores(self, rollout) -> tuple[torch.Tensor, list[str]]:
        responses = decode_responses(rollout, self.tokenizer)
        if self.reward_fn is not None:
            values = self.reward_fn(rollout.prompts, responses)
            return torch.tensor(values, dtype=torch.float32, device=rollout.input_ids.device), responses
        return self.model.reward_scores(rollout.input_ids, rollout.attention_mask), responses

    def _global_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.backend.device)
        return self.backend.all_reduce_sum(tensor).tolist()

    def iteration(self, index: int) -> dict:
        prompts = [self.prompts[i] for i in self.batches.micro_batches(index)[0]]
        # The samples of one prompt are consecutive rows of one process: grpo/rloo's groups.
        examples = [e for e in prompts for _ in range(self.ppo.samples_per_prompt)]
        t0 = time.perf_counter()
        rollout = sample(self.model, examples, self.tokenizer, self.ppo, self.backend.device,
                         synced=self.backend.world_size > 1)
        release_freed_memory()  # each phase frees what it allocated; see engine/memory.py
        t1 = time.perf_counter()
        scores, responses = self._scores(rollout)
        release_freed_memory()
        check_scores(self._global_sum([float((~scores.isfinite()).sum())])[0], index + 1)
        t2 = time.perf_counter()
        experience = build_experience(self.model, rollout, scores, self.ppo, self.kl.value,
                                      self.backend, self.reward_stats)
        release_freed_memory()
        lengths = rollout.response_mask.sum(dim=1)
        sums = [float(scores.sum()), float(experience.kl_per_response.sum()), float(lengths.sum()),
                float((~rollout.ended).sum()), float(len(examples))]
        if self.ppo.estimator.group_relative:
            sums.append(zero_std_share(scores, self.ppo.samples_per_prompt) * len(prompts))
        totals = self._global_sum(sums)
        score, kl, length, no_eos = (v / max(totals[4], 1.0) for v in totals[:4])
        check_kl(kl, index + 1)  # before training on a rollout from a policy that has gone
        stats = ppo_update(self.wrapped, experience, self.ppo, self.backend, self.scheduler,
                           vf_coef=self.ppo.vf_coef if self.ppo.arrangement == "1base-1lora" else 1.0,
                           train_actor=index >= self.ppo.critic_warmup_steps,
                           seed=self.train.seed * 100_003 + index, iteration=index + 1,
                           first_update=index * self.updates, ptx_batches=self.ptx, guard=self.guard,
                           ema=self.ema)
        t3 = time.perf_counter()
        row = {"step": index + 1, "score": score, "kl": kl, "kl_coef": self.kl.value,
               "response_length": length, "no_eos_share": no_eos, **stats,
               "lr": self.scheduler.get_last_lr()[0], "time_generate": t1 - t0,
               "time_score": t2 - t1, "time_train": t3 - t2, **memory_metrics()}
        if len(totals) > 5:  # share of prompts whose samples all scored the same (no signal)
            row["frac_reward_zero_std"] = totals[5] * self.ppo.samples_per_prompt / totals[4]
        if self.guard.total:
            row["bad_steps"] = self.guard.total
        self.kl.update(kl, int(totals[4]))
        self._samples(index + 1, rollout.prompts, responses, scores.tolist())
        return row

    def _samples(self, step: int, prompts, responses, scores) -> None:
        if not self.backend.is_main or step % self.train.log_every:
            return
        with (self.run_dir / SAMPLES).open("a") as handle:
            for prompt, response, score in list(zip(prompts, responses, scores, strict=True))[:4]:
                handle.write(json.dumps({"step": step, "prompt": prompt, "response": response,
                                         "score": score}) + "\n")

    # ------------------------------------------------------------ checkpoints, resume
    def _checkpoint_backend(self):
        return WithPPOState(self.backend, self.ema)

    def save(self, done: int) -> Path:
        state = {"kl_coef": self.kl.value, **self.guard.state(), "world_size": self.backend.world_size}
        path = save_checkpoint(self._checkpoint_backend(), self.run_dir, done, state, self.scheduler,
                               self.train.keep_checkpoints)
        self._saved = (done, path)
        self.guard.checkpoint = path
        return path

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return
        state = load_checkpoint(self._checkpoint_backend(), checkpoint, self.scheduler)
        self.start = state["step"]
        self.kl.value = state.get("kl_coef", self.kl.value)
        self.guard.load(state)
        self._saved = (self.start, checkpoint)
        self.guard.checkpoint = checkpoint
        self.logger.truncate_after(self.start)
        self._truncate_samples(self.start)
        say(self.backend, f"resuming from {checkpoint} (iteration {self.start})")

    def _truncate_samples(self, step: int) -> None:
        path = self.run_dir / SAMPLES
        if self.backend.is_main and path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(kept))

    def _stop_if_asked(self, stop: _StopRequest, done: int) -> None:
        """After Ctrl-C (on any rank): save iteration `done` unless saved already, and stop."""
        if not self._global_sum([float(stop.requested)])[0]:
            return
        if done == 0:
            raise TrainingInterrupted("stopped before the first iteration; nothing was saved")
        if self._saved is None or self._saved[0] != done:
            self.save(done)
        raise TrainingInterrupted(
            f"stopped at iteration {done}/{self.iterations}; checkpoint saved in {self._saved[1]}. "
            f"To continue: rlhf ppo --recipe {self.run_dir / 'recipe.yaml'} --resume")

    # ------------------------------------------------------------------------- run
    def _evaluate(self, step: int) -> dict:
        """The task score of the policy that final/ will hold (the EMA one when there is one)."""
        if self.scorer is None:
            return {}
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            row = {"step": step, "split": "eval", **self.scorer(self.model.policy_for_saving())}
        self.logger.log(row)
        return row

    def _show(self, progress: TrainingProgress, row: dict, done: int) -> None:
        shown = {k: row[k] for k in ("score", "kl", "response_length", "loss", "bad_steps") if k in row}
        progress.update(done, shown)
        if done % self.train.log_every == 0 or done == self.iterations:
            progress.log_line(f"iteration {done}/{self.iterations}  " + "  ".join(
                f"{k}={v:.4g}" for k, v in shown.items()))

    def run(self) -> dict:
        progress = TrainingProgress(self.iterations, self.start, self.backend.is_main, "ppo")
        last_eval = {}
        with _StopRequest(announce=self.backend.is_main) as stop:
            try:
                if self.start == 0:
                    last_eval = self._evaluate(0)
                for index in range(self.start, self.iterations):
                    self._stop_if_asked(stop, index)
                    row = self.iteration(index)
                    self.logger.log(row)
                    done = index + 1
                    self._show(progress, row, done)
                    if self.train.eval_every and done % self.train.eval_every == 0 and done < self.iterations:
                        last_eval = self._evaluate(done)
                    if self.train.save_every and done % self.train.save_every == 0 and done < self.iterations:
                        self.save(done)
                self._stop_if_asked(stop, self.iterations)
                last_eval = self._evaluate(self.iterations) or last_eval
            finally:
                progress.close()
                self.logger.close()
        return last_eval


def run_ppo(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    runner = PPORun(recipe, run_dir, backend)
    if resume:
        runner.resume()
    last_eval = runner.run()
    final = save_ppo_final(backend, runner.wrapped, runner.tokenizer, Path(run_dir) / FINAL, runner.ema)
    if backend.is_main:
        plot_run(run_dir)
        say(backend, f"saved {final}")
    return {k: v for k, v in last_eval.items() if k not in ("step", "split")}
