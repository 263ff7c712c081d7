"""What a PPO recipe will do, in words, for `rlhf ppo --dry-run` (no torch, no I/O)."""

from __future__ import annotations

import math

from ...schema import Recipe

_WITHOUT_CRITIC = {
    "1base-1lora": "one base: the policy LoRA (+ the frozen RM adapter with an RM)",
    "2base-2lora": "policy base + policy LoRA; the RM base with the frozen RM adapter",
    "separate": "actor, a frozen reference copy (+ the RM model with an RM)",
}


def ppo_plan(recipe: Recipe) -> list[str]:
    ppo, train = recipe.ppo, recipe.train
    responses = ppo.rollout_batch_size * ppo.samples_per_prompt
    minibatches = math.ceil(responses / ppo.mini_batch_size)
    sampled = (f"{ppo.rollout_batch_size} prompts x {ppo.samples_per_prompt} samples = {responses} responses"
               if ppo.samples_per_prompt > 1 else f"{responses} prompts, one response each")
    iterations = f"{train.max_steps} iterations" if train.max_steps else f"{train.epochs:g} epochs of prompts"
    lines = [f"rollout: {sampled} per process per iteration; {iterations}",
             f"updates: {ppo.ppo_epochs} epochs x {minibatches} minibatches of up to {ppo.mini_batch_size} "
             f"responses = {ppo.ppo_epochs * minibatches} optimizer steps per iteration"]
    if ppo.micro_batch_size and ppo.micro_batch_size < ppo.mini_batch_size:
        lines.append(f"micro-batches: {ppo.micro_batch_size} responses per forward/backward, "
                     f"{ppo.mini_batch_size // ppo.micro_batch_size} accumulated per optimizer step")
    if ppo.estimator.needs_critic:
        lines.append(f"advantage: {ppo.advantage} (gamma {ppo.gamma}, lambda {ppo.lam}) with a critic: "
                     f"value head, value loss, arrangement {ppo.arrangement}")
    else:
        lines.append(f"advantage: {ppo.advantage} ({ppo.estimator.summary}); critic-free: no value "
                     "head, no value loss, no critic learning rate")
        lines.append(f"arrangement {ppo.arrangement} without a critic: {_WITHOUT_CRITIC[ppo.arrangement]}")
    kl = f"adaptive from {ppo.kl_coef} to KL {ppo.kl_target}" if ppo.adaptive_kl else str(ppo.kl_coef)
    lines.append(f"KL penalty in the reward: {ppo.kl_estimator}, coefficient {kl}")
    if ppo.ptx_coef > 0:
        lines.append(f"ptx: + {ppo.ptx_coef} x SFT loss on {ppo.ptx_data}, "
                     f"{ppo.ptx_batch_size or ppo.mini_batch_size} rows per optimizer step")
    else:
        lines.append("ptx: off (ppo.ptx_coef 0)")
    if ppo.ema_decay:
        lines.append(f"actor EMA: decay {ppo.ema_decay}; final/ holds the EMA policy, final-online/ the "
                     "last online weights")
    else:
        lines.append("actor EMA: off (ppo.ema_decay unset)")
    tricks = _ppo_max_tricks(recipe)
    if tricks:
        lines.append("PPO-max: " + "; ".join(tricks))
    return lines + rlvr_plan(recipe.ppo)


def _ppo_max_tricks(recipe: Recipe) -> list[str]:
    """The PPO-max keys this recipe turns on, in words (none: the line is left out)."""
    ppo, tricks = recipe.ppo, []
    if ppo.reward_scaling or ppo.reward_centering:
        done = [w for w, on in (("minus the running mean", ppo.reward_centering),
                                ("over the running std", ppo.reward_scaling)) if on]
        tricks.append(f"scores {' and '.join(done)} of every score so far, "
                      f"then clipped to +-{ppo.reward_clip}")
    if ppo.advantage_clip is not None:
        tricks.append(f"advantages clipped to +-{ppo.advantage_clip}")
    if ppo.entropy_coef:
        tricks.append(f"entropy bonus {ppo.entropy_coef}")
    if ppo.dual_clip is not None:
        tricks.append(f"dual clip {ppo.dual_clip}")
    if any(getattr(ppo, k) is not None for k in ("critic_lr", "critic_adam_beta1", "critic_adam_beta2",
                                                  "critic_adam_eps")):
        settings = ppo.critic_optimizer(recipe.train)
        tricks.append(f"critic lr {settings['lr']:g}, betas {settings['betas']}, eps {settings['eps']:g}")
    return tricks


def rlvr_plan(ppo) -> list[str]:
    """The DAPO / Dr. GRPO keys, in one line, when any is on."""
    on = []
    if (ppo.clip_low, ppo.clip_high) != (ppo.clip_range, ppo.clip_range):
        on.append(f"ratio clipped to [1 - {ppo.clip_low}, 1 + {ppo.clip_high}]")
    if ppo.loss_aggregation != "token-mean":
        on.append(f"loss {ppo.loss_aggregation}")
    if ppo.scale_rewards != "auto":
        on.append(f"group advantages scaled by: {ppo.scale_rewards}")
    if ppo.dynamic_sampling:
        on.append(f"dynamic sampling (at most {ppo.max_sampling_rounds} rounds)")
    if ppo.overlong != "none":
        buffer = f" (buffer {ppo.overlong_buffer})" if ppo.overlong_buffer else ""
        on.append(f"overlong: {ppo.overlong}{buffer}")
    if ppo.kl_coef == 0:
        on.append("no reference forward (kl_coef 0)")
    return [f"DAPO / Dr. GRPO: {'; '.join(on)}"] if on else []
