"""PPO, one iteration at a time: rollout -> score -> advantages -> K epochs of updates.

Reuses the engine's optimiser, schedule, checkpoints, metrics and progress parts; the
arrangement (roles.py) decides where actor, critic, reference and reward live.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ...algorithms.kl import AdaptiveKLController, FixedKLController
from ...data.prompt_data import build_prompt_dataset
from ...data.sources import load_source
from ...engine.batching import GlobalBatches
from ...engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ...engine.metrics import MetricsLogger
from ...engine.optim import build_scheduler
from ...engine.plots import plot_run
from ...engine.progress import TrainingProgress
from ...engine.run_dir import FINAL
from ...errors import UserError
from ...rewards import load_reward_fn
from ...schema import Recipe
from ..common import say, tokenizer_for
from .build import build_arrangement
from .experience import build_experience
from .rollout import decode_responses, sample
from .saving import save_ppo_final
from .update import ppo_update

SAMPLES = "samples.jsonl"
# Mean KL (nats per response) past which the policy has left the reference for good.
KL_LIMIT = 1000.0


def _optimizer(arrangement, recipe: Recipe):
    """Actor and critic parameter groups; the critic gets its own rate when it has its own adapter."""
    train, ppo = recipe.train, recipe.ppo
    shared = ppo.arrangement == "1base-1lora"
    actor, critic = [], []
    for name, param in arrangement.named_parameters():
        if param.requires_grad:
            is_critic = name.startswith(("value_head", "critic.", "rm_body.")) or ".critic." in name
            (critic if is_critic and not shared else actor).append(param)
    groups = [{"params": actor, "lr": train.lr}]
    if critic:
        groups.append({"params": critic, "lr": train.lr * ppo.critic_lr_ratio})
    return torch.optim.AdamW(groups, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                             weight_decay=train.weight_decay)


def _reward_stats(recipe: Recipe) -> dict | None:
    if not recipe.ppo.reward_model:
        return None
    for candidate in (Path(recipe.ppo.reward_model) / FINAL, Path(recipe.ppo.reward_model)):
        if (candidate / "reward_stats.json").is_file():
            return json.loads((candidate / "reward_stats.json").read_text())
    return None


class PPORun:
    def __init__(self, recipe: Recipe, run_dir: Path, backend):
        self.recipe, self.run_dir, self.backend = recipe, Path(run_dir), backend
        self.ppo, self.train = recipe.ppo, recipe.train
        self.tokenizer = tokenizer_for(recipe)
        if self.ppo.ptx_coef:
            raise UserError("the pretraining (ptx) loss is not supported yet: set it to 0",
                            where="ppo.ptx_coef")
        self.prompts = self._load_prompts()
        self.reward_fn = load_reward_fn(self.ppo.reward_fn) if self.ppo.reward_fn else None
        if self.reward_fn is not None and self.ppo.reward_model:
            say(backend, "scores come from ppo.reward_fn; ppo.reward_model only initialises the critic")
        self.reward_stats = _reward_stats(recipe)
        if self.ppo.normalize_reward and self.reward_fn is None and self.reward_stats is None:
            say(backend, "ppo.normalize_reward: the reward model has no reward_stats.json; "
                         "scores are used as they are")
        arrangement = build_arrangement(recipe, self.tokenizer)
        optimizer = _optimizer(arrangement, recipe)
        self.wrapped = backend.prepare(arrangement, optimizer)
        self.model = backend.unwrap(self.wrapped)
        self.batches = GlobalBatches(len(self.prompts), self.ppo.rollout_batch_size, 1,
                                     backend.world_size, backend.rank, self.train.seed)
        self.iterations = self.batches.total_steps(self.train.epochs, self.train.max_steps)
        updates = self.ppo.ppo_epochs * math.ceil(self.ppo.rollout_batch_size / self.ppo.mini_batch_size)
        self.scheduler = build_scheduler(backend.optimizer, self.train, self.iterations * updates)
        self.kl = (AdaptiveKLController(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
                   if self.ppo.adaptive_kl else FixedKLController(self.ppo.kl_coef))
        self.logger = MetricsLogger(self.run_dir, backend.is_main, self.train.report_to)
        self.start = 0
        self.scorer = None
        if self.train.eval_reward_fn:
            from ..scoring import make_task_scorer

            self.scorer = make_task_scorer(recipe, self.tokenizer, backend)

    def _load_prompts(self) -> list[dict]:
        data = self.recipe.data
        rows = load_source(data.train, "prompts")
        limit = data.max_prompt_length or data.max_length - self.ppo.max_new_tokens
        if limit < 1:
            raise UserError("data.max_length leaves no room for ppo.max_new_tokens", where="data.max_length")
        prompts, report = build_prompt_dataset(rows, self.tokenizer, data.template, limit, source=data.train)
        say(self.backend, f"data.train: {report.summary()}")
        return prompts

    # ---------------------------------------------------------------- one iteration
    def _scores(self, rollout) -> tuple[torch.Tensor, list[str]]:
        responses = decode_responses(rollout, self.tokenizer)
        if self.reward_fn is not None:
            values = self.reward_fn(rollout.prompts, responses)
            return torch.tensor(values, dtype=torch.float32, device=rollout.input_ids.device), responses
        return self.model.reward_scores(rollout.input_ids, rollout.attention_mask), responses

    def _global_mean(self, values: list[float], count: float) -> list[float]:
        tensor = torch.tensor(values + [count], dtype=torch.float64, device=self.backend.device)
        total = self.backend.all_reduce_sum(tensor).tolist()
        return [v / max(total[-1], 1.0) for v in total[:-1]]

    def iteration(self, index: int) -> dict:
        examples = [self.prompts[i] for i in self.batches.micro_batches(index)[0]]
        t0 = time.perf_counter()
        rollout = sample(self.model, examples, self.tokenizer, self.ppo, self.backend.device,
                         synced=self.backend.world_size > 1)
        t1 = time.perf_counter()
        scores, responses = self._scores(rollout)
        t2 = time.perf_counter()
        experience = build_experience(self.model, rollout, scores, self.ppo, self.kl.value,
                                      self.backend, self.reward_stats)
        stats = ppo_update(self.wrapped, experience, self.ppo, self.backend, self.scheduler,
                           vf_coef=self.ppo.vf_coef if self.ppo.arrangement == "1base-1lora" else 1.0,
                           train_actor=index >= self.ppo.critic_warmup_steps,
                           seed=self.train.seed * 100_003 + index)
        t3 = time.perf_counter()
        lengths = rollout.response_mask.sum(dim=1)
        score, kl, length, no_eos = self._global_mean(
            [float(scores.sum()), float(experience.kl_per_response.sum()), float(lengths.sum()),
             float((~rollout.ended).sum())], float(len(examples)))
        row = {"step": index + 1, "score": score, "kl": kl, "kl_coef": self.kl.value,
               "response_length": length, "no_eos_share": no_eos, **stats,
               "lr": self.scheduler.get_last_lr()[0], "time_generate": t1 - t0,
               "time_score": t2 - t1, "time_train": t3 - t2}
        self.kl.update(kl, self.ppo.rollout_batch_size * self.backend.world_size)
        self._samples(index + 1, rollout.prompts, responses, scores.tolist())
        return row

    def _samples(self, step: int, prompts, responses, scores) -> None:
        if not self.backend.is_main or step % self.train.log_every:
            return
        with (self.run_dir / SAMPLES).open("a") as handle:
            for prompt, response, score in list(zip(prompts, responses, scores, strict=True))[:4]:
                handle.write(json.dumps({"step": step, "prompt": prompt, "response": response,
                                         "score": score}) + "\n")

    # ------------------------------------------------------------------------- run
    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return
        state = load_checkpoint(self.backend, checkpoint, self.scheduler)
        self.start = state["step"]
        self.kl.value = state.get("kl_coef", self.kl.value)
        self.logger.truncate_after(self.start)
        say(self.backend, f"resuming from {checkpoint} (iteration {self.start})")

    def _evaluate(self, step: int) -> dict:
        if self.scorer is None:
            return {}
        row = {"step": step, "split": "eval", **self.scorer(self.model.policy_for_saving())}
        self.logger.log(row)
        return row

    def _check(self, row: dict) -> None:
        bad = [k for k in ("loss", "policy_loss", "value_loss", "kl") if not math.isfinite(row[k])]
        if bad or row["kl"] > KL_LIMIT:
            what = (f"{', '.join(bad)} became NaN/inf" if bad
                    else f"KL to the reference exploded ({row['kl']:.1f})")
            raise UserError(f"PPO stopped at iteration {row['step']}: {what}; lower train.lr or raise "
                            "ppo.kl_coef; the last good checkpoint is kept")

    def run(self) -> dict:
        progress = TrainingProgress(self.iterations, self.start, self.backend.is_main, "ppo")
        last_eval = {}
        try:
            if self.start == 0:
                last_eval = self._evaluate(0)
            for index in range(self.start, self.iterations):
                row = self.iteration(index)
                self._check(row)
                self.logger.log(row)
                done = index + 1
                shown = {k: row[k] for k in ("score", "kl", "response_length", "loss")}
                progress.update(done, shown)
                if done % self.train.log_every == 0 or done == self.iterations:
                    progress.log_line(f"iteration {done}/{self.iterations}  " + "  ".join(
                        f"{k}={v:.4g}" for k, v in shown.items()))
                if self.train.eval_every and done % self.train.eval_every == 0 and done < self.iterations:
                    last_eval = self._evaluate(done)
                if self.train.save_every and done % self.train.save_every == 0 and done < self.iterations:
                    save_checkpoint(self.backend, self.run_dir, done, {"kl_coef": self.kl.value},
                                    self.scheduler, self.train.keep_checkpoints)
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
    final = save_ppo_final(backend, runner.wrapped, runner.tokenizer, Path(run_dir) / FINAL)
    if backend.is_main:
        plot_run(run_dir)
        say(backend, f"saved {final}")
    return {k: v for k, v in last_eval.items() if k not in ("step", "split")}
