"""PPO, one iteration at a time, as in the paper:

    rollout -> score -> experience -> advantages -> K epochs of minibatch updates

The arrangement (roles.py) decides where actor, critic, reference and reward live; the
engine's runner (engine/runner.py) runs the iterations: Ctrl-C, NaN/inf policy, eval/save
cadence, checkpoints and `--resume` (model, optimizer, schedule, RNG, KL coefficient,
skipped-update count, actor EMA, PPO-max's running reward moments; prompts and ptx batches
are functions of the iteration and update numbers). Timings, memory and global means live
in bookkeeping.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ...data.loaders import load_prompts
from ...engine.bad_steps import BadSteps
from ...engine.batching import GlobalBatches
from ...engine.judge import function_judge, model_judge
from ...engine.memory import memory_metrics
from ...engine.optim import build_scheduler
from ...engine.progress import say
from ...engine.reduce import global_sums
from ...engine.rollout import decode_responses, sample, seed_sampling_stream
from ...engine.run_dir import FINAL
from ...engine.runner import finish_run, run_stage
from ...engine.scoring import make_task_scorer
from ...engine.stage import StageParts
from ...models.arrangement_build import build_arrangement
from ...models.policy import tokenizer_for
from ...schema import Recipe
from .bookkeeping import Phases, SampleLog, rollout_means
from .dynamic_sampling import DynamicSampling
from .ema import ActorEMA
from .experience import make_experience, with_advantages
from .guard import check_kl, check_scores, diverged
from .optim import ppo_optimizer
from .overlong import overlong_masked
from .ptx import PtxBatches
from .reward_scaling import RunningRewards
from .saving import save_ppo_final
from .setup import kl_controller, reward_stats
from .update import PPOUpdate, updates_per_iteration


class PPO:
    def __init__(self, recipe: Recipe, run_dir: Path, backend):
        self.recipe, self.ppo, self.train, self.backend = recipe, recipe.ppo, recipe.train, backend
        self.tokenizer = tokenizer_for(recipe)
        self.prompts = load_prompts(recipe, self.tokenizer, backend)
        ptx = PtxBatches(recipe, self.tokenizer, backend) if self.ppo.ptx_coef > 0 else None
        self._reward_source()
        arrangement = build_arrangement(recipe, self.tokenizer, announce=backend.is_main)
        self.wrapped = backend.prepare(arrangement, ppo_optimizer(arrangement, recipe))
        self.model = backend.unwrap(self.wrapped)
        self.judge = (function_judge(self.ppo.reward_fn, "ppo.reward_fn") if self.ppo.reward_fn
                      else model_judge(self.model.reward_scores))
        seed_sampling_stream(self.train.seed, backend.rank)
        self.ema = ActorEMA(self.model, self.ppo.ema_decay) if self.ppo.ema_decay else None
        # rollout_batch_size prompts per process, each sampled samples_per_prompt times.
        self.batches = GlobalBatches(len(self.prompts), self.ppo.rollout_batch_size, 1,
                                     backend.world_size, backend.rank, self.train.seed,
                                     what="prompts", keys="ppo.rollout_batch_size")
        self.iterations = self.batches.total_steps(self.train.epochs, self.train.max_steps)
        per_iteration = updates_per_iteration(self.ppo)
        self.scheduler = build_scheduler(backend.optimizer, self.train, self.iterations * per_iteration)
        self.kl = kl_controller(self.ppo)
        self.running_rewards = (RunningRewards(self.ppo, backend)
                                if self.ppo.reward_scaling or self.ppo.reward_centering else None)
        self.bad_steps = BadSteps(self.train.max_bad_steps, backend.can_skip_steps, diverged)
        self.update = PPOUpdate(self.wrapped, self.ppo, backend, self.scheduler,
                                vf_coef=self.model.vf_coef,
                                updates_per_iteration=per_iteration, seed=self.train.seed,
                                ptx_batches=ptx, bad_steps=self.bad_steps, ema=self.ema,
                                critic_apart=self.model.critic_apart and backend.passes_apart)
        self.samples = SampleLog(run_dir, backend.is_main, self.train.log_every)
        self.dynamic = None  # DAPO's dynamic sampling
        if self.ppo.dynamic_sampling:
            self.dynamic = DynamicSampling(self.ppo, self.prompts, self.batches, backend, self.train.seed,
                                           self.sample_prompts, self.score, self.reward_stats,
                                           self.tokenizer.pad_token_id)
        self.scorer = None
        if self.train.eval_reward_fn:
            self.scorer = make_task_scorer(recipe, self.tokenizer, backend)

    def _reward_source(self) -> None:
        if self.ppo.reward_fn and self.ppo.reward_model:
            say(self.backend, "scores come from ppo.reward_fn; ppo.reward_model only initialises the critic")
        # The RM's mean/std normalise the RM's own scores, never a reward function's.
        self.reward_stats = reward_stats(self.recipe) if not self.ppo.reward_fn else None
        if self.ppo.normalize_reward and not self.ppo.reward_fn and self.reward_stats is None:
            say(self.backend, "ppo.normalize_reward: the reward model has no reward_stats.json; "
                              "scores are used as they are")

    def parts(self) -> StageParts:
        state = {"kl": self.kl, **({"ema": self.ema} if self.ema is not None else {}),
                 **({"running_rewards": self.running_rewards} if self.running_rewards is not None else {})}
        return StageParts(
            title="ppo", unit="iteration", total_steps=self.iterations, scheduler=self.scheduler,
            step=self.iteration, evaluate=self.evaluate, bad_steps=self.bad_steps,
            shown=("score", "kl", "response_length", "loss", "bad_steps"),
            evaluates_at_ends=self.scorer is not None, state=state, resumed=self.samples.truncate_after)

    # ------------------------------------------------------------------ one iteration
    def iteration(self, index: int) -> dict:
        phases, sampling = Phases(), {}
        if self.dynamic is not None:  # rounds of sampling and scoring (dynamic_sampling.py)
            with phases("generate"):
                rollout, scores, responses, sampling = self.dynamic(index)
        else:
            with phases("generate"):
                rollout = self.rollout(index)
            with phases("score"):
                scores, responses = self.score(rollout, index)
        with phases("train"):
            experience = make_experience(self.model, rollout, scores, self.ppo, self.reward_stats,
                                         self.running_rewards)
            means = rollout_means(rollout, scores, experience, self.ppo, self.backend)
            check_kl(means["kl"], index + 1)  # before training on a rollout from a policy that has gone
            experience = overlong_masked(experience, rollout.ended, self.ppo)  # ppo.overlong: mask
            experience = with_advantages(experience, self.ppo, self.kl.value, self.backend)
            stats = self.update(experience, index)
        row = {**self._row(index + 1, means, stats, phases.seconds), **sampling}
        self.kl.update(means["kl"], int(means["responses"]))
        self.samples.write(index + 1, rollout.prompts, responses, scores.tolist())
        return row

    def rollout(self, index: int):
        """This process's prompts of iteration `index`, each sampled `samples_per_prompt` times
        (consecutive rows of one process: grpo/rloo's groups)."""
        return self.sample_prompts([self.prompts[i] for i in self.batches.micro_batches(index)[0]])

    def sample_prompts(self, prompts: list):
        examples = [p for p in prompts for _ in range(self.ppo.samples_per_prompt)]
        return sample(self.model, examples, self.tokenizer, self.ppo, self.backend.device,
                      synced=self.backend.world_size > 1)

    def score(self, rollout, index: int) -> tuple[torch.Tensor, list[str]]:
        """Raw scores [B] from the reward function or model; a NaN/inf one stops the run."""
        responses = decode_responses(rollout, self.tokenizer)
        scores = self.judge(rollout, responses)
        check_scores(global_sums(self.backend, {"bad": float((~scores.isfinite()).sum())})["bad"], index + 1)
        return scores, responses

    def _row(self, step: int, means: dict, stats: dict, seconds: dict) -> dict:
        row = {"step": step, "score": means["score"], "kl": means["kl"], "kl_coef": self.kl.value,
               "response_length": means["response_length"], "no_eos_share": means["no_eos_share"], **stats,
               "lr": self.scheduler.get_last_lr()[0], **seconds, **memory_metrics()}
        if self.running_rewards is not None:
            row.update(self.running_rewards.stats())
        if "frac_reward_zero_std" in means:
            row["frac_reward_zero_std"] = means["frac_reward_zero_std"]
        if self.bad_steps.total:
            row["bad_steps"] = self.bad_steps.total
        return row

    def evaluate(self, step: int) -> dict:
        """The task score of the policy that final/ will hold (the EMA one when there is one)."""
        if self.scorer is None:
            return {}
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            return {"step": step, "split": "eval", **self.scorer(self.model.policy_for_saving())}


def run_ppo(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    ppo = PPO(recipe, run_dir, backend)
    last_eval = run_stage(recipe, backend, run_dir, ppo.parts(), resume)
    final = save_ppo_final(backend, ppo.wrapped, ppo.tokenizer, Path(run_dir) / FINAL, ppo.ema)
    return finish_run(backend, run_dir, final, last_eval)
