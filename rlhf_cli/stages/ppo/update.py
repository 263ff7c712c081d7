"""K epochs of minibatch updates on one rollout batch: clipped policy and value losses."""

from __future__ import annotations

import torch

from ...algorithms.masked import masked_mean
from ...algorithms.ppo import explained_variance, policy_loss, value_loss
from ...schema import PPOSection
from .experience import Experience


def _rows(experience: Experience, index: torch.Tensor) -> dict:
    r = experience.rollout
    return {
        "input_ids": r.input_ids[index], "attention_mask": r.attention_mask[index],
        "tokens": r.tokens[index], "mask": r.response_mask[index],
        "old_logprobs": experience.old_logprobs[index], "old_values": experience.old_values[index],
        "advantages": experience.advantages[index], "returns": experience.returns[index],
    }


def minibatch_loss(wrapped, rows: dict, prompt_width: int, ppo: PPOSection, vf_coef: float,
                   train_actor: bool):
    logp, values, entropy = wrapped(rows["input_ids"], rows["attention_mask"], prompt_width,
                                    rows["tokens"])
    mask = rows["mask"]
    pg, pg_stats = policy_loss(logp, rows["old_logprobs"], rows["advantages"], mask, ppo.clip_range)
    vf, vf_stats = value_loss(values, rows["old_values"], rows["returns"], mask, ppo.clip_range_value)
    # During critic warm-up the actor term is kept at weight 0 so that every trainable
    # parameter stays in the graph (DDP expects that) while only the critic learns.
    loss = (1.0 if train_actor else 0.0) * pg + vf_coef * vf
    stats = {"policy_loss": float(pg.detach()), "value_loss": float(vf.detach()),
             "loss": float(loss.detach()),
             "entropy": float(masked_mean(entropy.detach(), mask)),
             "clip_frac": float(pg_stats["clip_frac"]), "approx_kl": float(pg_stats["approx_kl"]),
             "vf_clip_frac": float(vf_stats["vf_clip_frac"])}
    return loss, stats


def ppo_update(wrapped, experience: Experience, ppo: PPOSection, backend, scheduler, *,
               vf_coef: float, train_actor: bool, seed: int) -> dict:
    rows = experience.rollout.input_ids.shape[0]
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    count = 0
    wrapped.train()
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, ppo.mini_batch_size):
            index = order[start:start + ppo.mini_batch_size].to(experience.rollout.input_ids.device)
            with backend.autocast():
                loss, stats = minibatch_loss(wrapped, _rows(experience, index),
                                             experience.rollout.prompt_width, ppo, vf_coef, train_actor)
            backend.backward(loss)
            stats["grad_norm"] = backend.optimizer_step()
            scheduler.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
    means = {k: v / count for k, v in totals.items()}
    means["explained_variance"] = float(explained_variance(
        experience.old_values, experience.returns, experience.rollout.response_mask))
    return means
