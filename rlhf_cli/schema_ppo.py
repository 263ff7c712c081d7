"""The recipe's `ppo` section (schema.py holds the others; the same conventions)."""

from __future__ import annotations

from dataclasses import dataclass

from .algorithms.catalog import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATOR_NAMES,
    LOSS_AGGREGATION_NAMES,
    OVERLONG_HANDLINGS,
    REWARD_SCALINGS,
    Estimator,
)
from .schema_fields import Problems, above, at_least, choice, function_ref, local_path

PPO_ARRANGEMENTS = ("separate", "2base-2lora", "1base-2lora", "1base-1lora")


@dataclass
class PPOSection:
    arrangement: str = choice("1base-1lora", PPO_ARRANGEMENTS)
    reward_model: str | None = local_path()
    reward_fn: str | None = function_ref()
    kl_coef: float = 0.05
    kl_estimator: str = choice("k1", KL_ESTIMATOR_NAMES)
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    critic_lr_ratio: float = 5.0
    ppo_epochs: int = at_least(4, 1)
    rollout_batch_size: int = at_least(64, 1)
    mini_batch_size: int = at_least(16, 1)
    # Responses per forward/backward; mini_batch_size / micro_batch_size of them are accumulated
    # into one optimizer step (less activation memory, the same update). Default: the minibatch.
    micro_batch_size: int | None = at_least(None, 1)
    max_new_tokens: int = at_least(64, 1)
    temperature: float = above(1.0, 0)
    top_p: float = 1.0
    top_k: int = 0
    reward_clip: float = 10.0
    normalize_reward: bool = False
    no_eos_penalty: float = -1.0
    # The first N iterations train the critic alone; the actor's weights stay bitwise unchanged
    # (no policy or ptx term, the actor's gradients dropped before each step). In 1base-1lora
    # that trains only the value head, on the shared adapter's states as they are. Not with
    # launch.deepspeed (it steps inside its backward). stages/ppo/warmup.py says why.
    critic_warmup_steps: int = 0
    # Advantage estimator; which ones train a critic or compare a prompt's samples: `estimator`.
    advantage: str = choice("gae", ADVANTAGE_ESTIMATORS)
    # Responses sampled per prompt (each prompt repeated); group-relative estimators need >= 2.
    samples_per_prompt: int = at_least(1, 1)
    # InstructGPT's PPO-ptx: + ptx_coef x the SFT loss on ppo.ptx_data (SFT rows).
    ptx_coef: float = at_least(0.0, 0)
    ptx_data: str | None = local_path()
    ptx_batch_size: int | None = at_least(None, 1)  # SFT rows per update; default ppo.mini_batch_size
    # EMA of the actor's trainable weights, updated after every optimizer step; final/ holds it.
    ema_decay: float | None = above(None, 0)  # and below 1
    # PPO-max (MOSS-RLHF, "Secrets of RLHF in LLMs, Part I"): each off by default; README's
    # PPO-max table gives the paper's values. Scores: running moments of every score so far
    # (this batch included, all processes), after the EOS penalty and before reward_clip.
    reward_scaling: bool = False  # divide each score by the running std
    reward_centering: bool = False  # subtract the running mean (both on: the paper's normalisation)
    advantage_clip: float | None = above(None, 0)  # |A| <= c, after the advantages are whitened
    entropy_coef: float = at_least(0.0, 0)  # loss -= coef x token-mean entropy (raises entropy)
    dual_clip: float | None = above(None, 1)  # where A < 0 the policy loss is at most -c.A
    # The critic's optimizer group where it has weights of its own (not 1base-1lora, not
    # critic-free): critic_lr replaces train.lr x critic_lr_ratio; unset betas/eps: train.adam_*.
    critic_lr: float | None = above(None, 0)
    critic_adam_beta1: float | None = at_least(None, 0)  # and below 1
    critic_adam_beta2: float | None = at_least(None, 0)  # and below 1
    critic_adam_eps: float | None = above(None, 0)
    # DAPO / Dr. GRPO (RL with verifiable rewards); the defaults change nothing.
    # Clip-higher: the ratio is clipped to [1 - low, 1 + high]; each defaults to ppo.clip_range
    # (DAPO: 0.2 / 0.28).
    clip_range_low: float | None = above(None, 0)
    clip_range_high: float | None = above(None, 0)
    # How per-token losses become a minibatch's loss (algorithms/aggregation.py).
    loss_aggregation: str = choice("token-mean", LOSS_AGGREGATION_NAMES)
    # grpo/rloo: divide the group-relative advantage by the group's std, the batch's, or not
    # at all (Dr. GRPO: none); auto: grpo group, rloo none.
    scale_rewards: str = choice("auto", REWARD_SCALINGS)
    # DAPO's dynamic sampling: drop the groups whose samples all scored the same and sample
    # more prompts until every process has ppo.rollout_batch_size groups, at most
    # max_sampling_rounds generate calls an iteration (then the batch is filled with dropped groups).
    dynamic_sampling: bool = False
    max_sampling_rounds: int = at_least(3, 1)
    # Responses cut at ppo.max_new_tokens (no EOS): `mask` gives them zero loss weight; `penalty`
    # adds DAPO's soft length penalty to every score (0 up to max_new_tokens - overlong_buffer
    # tokens, then linear down to -1 at max_new_tokens).
    overlong: str = choice("none", OVERLONG_HANDLINGS)
    overlong_buffer: int | None = at_least(None, 1)

    @property
    def clip_low(self) -> float:
        return self.clip_range if self.clip_range_low is None else self.clip_range_low

    @property
    def clip_high(self) -> float:
        return self.clip_range if self.clip_range_high is None else self.clip_range_high

    @property
    def estimator(self) -> Estimator:
        """What `advantage` needs: a critic or not, a group of samples per prompt or not."""
        return ADVANTAGE_ESTIMATORS[self.advantage]

    def critic_optimizer(self, train) -> dict:  # train: schema.TrainSection
        """The critic group's lr, betas and eps where the critic has weights of its own:
        critic_lr (else train.lr x critic_lr_ratio) and critic_adam_* where set, else the
        actor's train.adam_* (PPO-max gives the critic its own rate and eps)."""
        def own(value, fallback):
            return fallback if value is None else value

        betas = (own(self.critic_adam_beta1, train.adam_beta1), own(self.critic_adam_beta2, train.adam_beta2))
        return {"lr": own(self.critic_lr, train.lr * self.critic_lr_ratio), "betas": betas,
                "eps": own(self.critic_adam_eps, train.adam_eps)}

    def problems(self, recipe) -> Problems:  # recipe: schema.Recipe
        if recipe.stage != "ppo":
            return
        if not (self.reward_model or self.reward_fn):
            yield "ppo", "PPO needs a reward: set `ppo.reward_model` or `ppo.reward_fn`"
        if self.estimator.group_relative and self.samples_per_prompt < 2:
            yield ("ppo.samples_per_prompt",
                   f"{self.advantage} compares several samples of each prompt: set it to 2 or more")
        if not self.estimator.needs_critic:
            yield from self._critic_free_problems()
        yield from self._micro_batch_problems()
        if self.critic_warmup_steps and recipe.launch.deepspeed:
            yield ("ppo.critic_warmup_steps", "cannot keep the actor still under launch.deepspeed (DeepSpeed "
                   "steps every weight inside its backward): set it to 0 or train without DeepSpeed")
        if self.ptx_coef > 0 and not self.ptx_data:
            yield "ppo.ptx_coef", "needs SFT data for the ptx loss: set `ppo.ptx_data`"
        if self.ema_decay is not None and self.ema_decay >= 1:
            yield "ppo.ema_decay", f"must be below 1, got {self.ema_decay}"
        yield from self._ppo_max_problems()
        yield from self._rlvr_problems()

    def _rlvr_problems(self) -> Problems:
        """DAPO / Dr. GRPO keys that contradict each other or the estimator."""
        if self.clip_high < self.clip_low:
            yield ("ppo.clip_range_high", f"{self.clip_high} is below the low clip range {self.clip_low} "
                   "(ppo.clip_range_low, default ppo.clip_range): clip-higher needs high >= low")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            yield ("ppo.dynamic_sampling", "drops the prompts whose samples all scored the same, which "
                   "needs a group: set ppo.samples_per_prompt to 2 or more")
        if self.scale_rewards != "auto" and not self.estimator.group_relative:
            yield ("ppo.scale_rewards", f"scales group-relative advantages (grpo, rloo), not "
                   f"{self.advantage}'s: leave it at auto")
        if self.overlong == "penalty" and self.overlong_buffer is None:
            yield "ppo.overlong", "penalty needs the length of its buffer: set ppo.overlong_buffer"
        if self.overlong_buffer is not None and self.overlong != "penalty":
            yield "ppo.overlong_buffer", "is the soft length penalty's: set ppo.overlong to penalty"
        if self.overlong_buffer is not None and self.overlong_buffer > self.max_new_tokens:
            yield ("ppo.overlong_buffer", f"{self.overlong_buffer} is longer than the responses "
                   f"(ppo.max_new_tokens {self.max_new_tokens})")

    def _critic_free_problems(self) -> Problems:
        no_critic = f"ppo.advantage {self.advantage} trains no critic"
        if self.arrangement == "1base-2lora":
            yield ("ppo.arrangement", f"{no_critic}, and 1base-2lora's second adapter is the critic: "
                   "use 1base-1lora")
        if self.arrangement == "2base-2lora" and not self.reward_model:
            yield ("ppo.arrangement", f"{no_critic}, and with a reward function 2base-2lora's second "
                   "base would hold nothing: use 1base-1lora")
        if self.critic_warmup_steps:
            yield "ppo.critic_warmup_steps", f"{no_critic} to warm up: set it to 0"

    def _ppo_max_problems(self) -> Problems:
        """The critic's own optimizer settings need a critic with weights of its own."""
        for key in ("critic_adam_beta1", "critic_adam_beta2"):
            if (getattr(self, key) or 0) >= 1:
                yield f"ppo.{key}", f"must be below 1, got {getattr(self, key)}"
        own = [k for k in ("critic_lr", "critic_adam_beta1", "critic_adam_beta2", "critic_adam_eps")
               if getattr(self, k) is not None]
        if not own:
            return
        if not self.estimator.needs_critic:
            yield f"ppo.{own[0]}", f"ppo.advantage {self.advantage} trains no critic: leave it unset"
        elif self.arrangement == "1base-1lora":
            yield (f"ppo.{own[0]}", "1base-1lora's critic trains the actor's adapter (one optimizer "
                   "group, train.lr): use 1base-2lora, 2base-2lora or separate, or leave it unset")

    def _micro_batch_problems(self) -> Problems:
        """Every optimizer step must accumulate the same number of micro-batches (DeepSpeed counts
        them to find the step): the minibatch divides into micro-batches and the rollout into
        minibatches."""
        micro, mini = self.micro_batch_size, self.mini_batch_size
        if micro is None or micro == mini:
            return
        if micro > mini or mini % micro:
            yield "ppo.micro_batch_size", f"{micro} must divide ppo.mini_batch_size ({mini})"
        responses = self.rollout_batch_size * self.samples_per_prompt
        if responses % mini:
            yield ("ppo.micro_batch_size", f"with micro-batches, ppo.mini_batch_size ({mini}) must divide "
                   f"the responses of a rollout ({responses} per process)")
