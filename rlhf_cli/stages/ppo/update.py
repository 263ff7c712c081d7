"""K epochs of minibatch updates on one rollout batch: the clipped policy loss, the clipped
value loss (with a critic) and the SFT loss of PPO-ptx (with `ppo.ptx_coef`).

An update whose loss or gradient norm is NaN/inf on any process is skipped (guard.py): no
optimizer step, no EMA step, its numbers left out of the means; the schedule moves on.
"""

from __future__ import annotations

import torch

from ...algorithms.masked import masked_mean
from ...algorithms.ppo import explained_variance, policy_loss, value_loss
from ...engine.memory import release_freed_memory
from ...schema import PPOSection
from .experience import Experience, summed_over_processes


def _rows(experience: Experience, index: torch.Tensor) -> dict:
    r = experience.rollout
    rows = {
        "input_ids": r.input_ids[index], "attention_mask": r.attention_mask[index],
        "tokens": r.tokens[index], "mask": r.response_mask[index],
        "old_logprobs": experience.old_logprobs[index], "advantages": experience.advantages[index],
    }
    if experience.old_values is not None:
        rows["old_values"], rows["returns"] = experience.old_values[index], experience.returns[index]
    return rows


def minibatch_loss(wrapped, rows: dict, prompt_width: int, ppo: PPOSection, vf_coef: float,
                   train_actor: bool, ptx: dict | None = None, share: float = 1.0, ptx_share: float = 1.0):
    """(loss, stats). loss = share·(a·policy loss + vf_coef·value loss) + ptx_share·ptx_coef·SFT loss,
    with a = 0 during critic warm-up, the value loss only with a critic and the SFT loss (on
    the `ptx` batch) only with ptx. With one process and one micro-batch a minibatch, both
    shares are 1 (see `_share`)."""
    outputs = wrapped(rows["input_ids"], rows["attention_mask"], prompt_width, rows["tokens"], ptx=ptx)
    logp, values, entropy = outputs[:3]
    mask = rows["mask"]
    pg, pg_stats = policy_loss(logp, rows["old_logprobs"], rows["advantages"], mask, ppo.clip_range)
    # During critic warm-up the actor term is kept at weight 0 so that every trainable
    # parameter stays in the graph (DDP expects that) while only the critic learns.
    rl_loss = (1.0 if train_actor else 0.0) * pg
    stats = {"policy_loss": float(pg.detach()),
             "entropy": float(masked_mean(entropy.detach(), mask)),
             "clip_frac": float(pg_stats["clip_frac"]), "approx_kl": float(pg_stats["approx_kl"])}
    if values is not None:
        vf, vf_stats = value_loss(values, rows["old_values"], rows["returns"], mask, ppo.clip_range_value)
        rl_loss = rl_loss + vf_coef * vf
        stats.update(value_loss=float(vf.detach()), vf_clip_frac=float(vf_stats["vf_clip_frac"]))
    loss = share * rl_loss
    if ptx is not None:
        loss = loss + ptx_share * ppo.ptx_coef * outputs[3]
        stats["ptx_loss"] = float(outputs[3].detach())
    return loss, stats


def _global_tokens(mask: torch.Tensor, backend) -> torch.Tensor:
    return backend.all_reduce_sum(mask.detach().sum().to(torch.float64)).clamp(min=1.0)


def _share(mask: torch.Tensor, global_tokens: torch.Tensor, backend) -> float:
    """This micro-batch's tokens over the mean tokens per rank of the whole minibatch.

    The losses are token-means over a micro-batch's rows, and DDP/ZeRO average the ranks'
    gradients; scaled by this share and summed over the micro-batches, that is the gradient
    of the token-mean over the whole minibatch of all ranks, as one process computes it in
    one forward. (One micro-batch on one process: 1.)
    """
    return float(mask.detach().sum().to(torch.float64) * backend.world_size / global_tokens)


def _ptx_tokens(ptx: dict) -> torch.Tensor:
    return ptx["labels"][:, 1:] != -100


def _split_ptx(ptx: dict | None, pieces: int) -> list[dict | None]:
    """The update's SFT batch split by rows over its micro-batches (None where none is left)."""
    if ptx is None:
        return [None] * pieces
    parts = [{k: v[rows] for k, v in ptx.items()}
             for rows in torch.arange(ptx["input_ids"].shape[0]).tensor_split(pieces)]
    return [part if part["input_ids"].shape[0] else None for part in parts]


def _bad(loss: torch.Tensor, backend) -> bool:
    """Whether any rank's loss is NaN/inf (every rank gets the same answer)."""
    flag = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], dtype=torch.float64,
                        device=backend.device)
    return float(backend.all_reduce_sum(flag)[0]) > 0


def _minibatch_update(wrapped, experience: Experience, index: torch.Tensor, ptx: dict | None, ppo: PPOSection,
                      backend, vf_coef: float, train_actor: bool, totals: dict) -> tuple[bool, float]:
    """One optimizer step on one minibatch, a micro-batch at a time; (applied, grad norm).

    Every micro-batch's forward and backward run (DDP expects each backward; only the last
    one synchronises gradients), then the step is taken or, when any loss was NaN/inf,
    dropped. DeepSpeed applies the update inside its backward, so there a NaN/inf loss
    stops before its backward. The stats are added to `totals`, weighted by token share,
    only for an applied step.
    """
    micro = ppo.micro_batch_size or ppo.mini_batch_size
    pieces = index.split(micro)
    minibatch_tokens = _global_tokens(experience.rollout.response_mask[index], backend)
    ptx_parts = _split_ptx(ptx, len(pieces))
    ptx_tokens = _global_tokens(_ptx_tokens(ptx), backend) if ptx is not None else None
    bad, weighted = False, []
    for i, (rows_index, ptx_part) in enumerate(zip(pieces, ptx_parts, strict=True)):
        rows = _rows(experience, rows_index)
        share = _share(rows["mask"], minibatch_tokens, backend)
        ptx_share = _share(_ptx_tokens(ptx_part), ptx_tokens, backend) if ptx_part is not None else 1.0
        with backend.accumulating(i < len(pieces) - 1), backend.autocast():
            loss, stats = minibatch_loss(wrapped, rows, experience.rollout.prompt_width, ppo, vf_coef,
                                         train_actor, ptx_part, share, ptx_share)
            if _bad(loss, backend):
                if not backend.can_skip_steps:
                    return False, float("nan")  # DeepSpeed would apply it: never call its backward
                bad = True
            backend.backward(loss)
        del loss
        weighted.append((stats, share, ptx_share))
    if bad:  # as the shared loop does: every backward ran, then the gradients are dropped
        backend.skip_step()
        return False, float("nan")
    grad_norm = backend.optimizer_step()
    if backend.skipped_step:
        return False, grad_norm
    for stats, share, ptx_share in weighted:
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value * (ptx_share if key == "ptx_loss" else share)
    return True, grad_norm


def ppo_update(wrapped, experience: Experience, ppo: PPOSection, backend, scheduler, *,
               vf_coef: float, train_actor: bool, seed: int, iteration: int = 1, first_update: int = 0,
               ptx_batches=None, guard=None, ema=None) -> dict:
    """Means over the applied updates (token-means over all ranks' minibatches).

    `iteration` (1-based) and `first_update` (this iteration's first update, counted over the
    run) place it in the run: the ptx batch of update u is `ptx_batches(u)`; `guard`
    (guard.BadUpdates) counts skipped updates and stops the run; `ema` (ema.ActorEMA) follows
    every applied step.
    """
    rows = experience.rollout.input_ids.shape[0]
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    applied_count, grad_norm, update = 0, 0.0, first_update
    wrapped.train()
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, ppo.mini_batch_size):
            index = order[start:start + ppo.mini_batch_size].to(experience.rollout.input_ids.device)
            ptx = ptx_batches(update) if ptx_batches is not None else None
            applied, norm = _minibatch_update(wrapped, experience, index, ptx, ppo, backend, vf_coef,
                                              train_actor, totals)
            release_freed_memory()  # the minibatch's activations and gradients (engine/memory.py)
            scheduler.step()
            update += 1
            if guard is not None:
                guard.record(not applied, iteration)
            if not applied:
                continue
            if ema is not None:
                ema.update()
            grad_norm += norm
            applied_count += 1
    if not applied_count:  # every update skipped (the same on every rank)
        return {}
    return _means(totals, applied_count, grad_norm, experience, ppo, backend, vf_coef, train_actor)


def _means(totals: dict, count: int, grad_norm: float, experience: Experience, ppo: PPOSection, backend,
           vf_coef: float, train_actor: bool) -> dict:
    # Every rank logs the same numbers: the token-means over all ranks' minibatches.
    keys = sorted(totals)
    summed = backend.all_reduce_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                                                 device=backend.device)).tolist()
    means = {k: v / (count * backend.world_size) for k, v in zip(keys, summed, strict=True)}
    means["loss"] = ((1.0 if train_actor else 0.0) * means["policy_loss"]
                     + vf_coef * means.get("value_loss", 0.0) + ppo.ptx_coef * means.get("ptx_loss", 0.0))
    means["grad_norm"] = grad_norm / count
    if experience.old_values is not None:
        means["explained_variance"] = float(explained_variance(
            experience.old_values, experience.returns, experience.rollout.response_mask,
            reduce=summed_over_processes(backend)))
    return means
