"""K epochs of minibatch updates on one rollout batch: the clipped policy loss, the clipped
value loss (with a critic) and the SFT loss of PPO-ptx (with `ppo.ptx_coef`).

An update whose loss or gradient norm is NaN/inf on any process is skipped and recorded in
the run's NaN/inf counter (engine/bad_steps.py): no optimizer step, no EMA step, its
numbers left out of the means; the schedule moves on.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ...algorithms.aggregation import aggregation
from ...algorithms.masked import masked_mean
from ...algorithms.ppo import explained_variance, policy_loss, value_loss
from ...engine.memory import release_freed_memory
from ...engine.reduce import global_sums
from ...models.arrangements import ACTOR_PASS, BOTH_PASSES, CRITIC_PASS
from ...schema import PPOSection
from .experience import Experience, summed_over_processes
from .warmup import drop_actor_gradients


def minibatch_loss(wrapped, rows: Experience, ppo: PPOSection, vf_coef: float, train_actor: bool,
                   ptx: dict | None = None, share: float = 1.0, ptx_share: float = 1.0,
                   part: str = BOTH_PASSES):
    """(loss, stats). loss = share·(a·policy loss + vf_coef·value loss) + ptx_share·ptx_coef·SFT loss,
    with a = 0 during critic warm-up, the value loss only with a critic and the SFT loss (on
    the `ptx` batch) only with ptx. With one process and one micro-batch a minibatch, both
    shares are 1 (see `_share`).

    `part` (see `Arrangement.forward`): ACTOR_PASS gives the terms of the actor's log-probs
    (policy and SFT losses), CRITIC_PASS the value loss alone; their sum is the BOTH_PASSES
    loss, and each trainable weight gets its gradient from one of the two."""
    outputs = wrapped(rows.input_ids, rows.attention_mask, rows.prompt_width, rows.tokens, ptx=ptx,
                      part=part)
    logp, values, entropy = outputs[:3]
    mask = rows.response_mask
    terms, stats = [], {}
    aggregate, _ = aggregation(ppo.loss_aggregation, ppo.max_new_tokens)  # DAPO / Dr. GRPO keys
    if logp is not None:
        pg, pg_stats = policy_loss(logp, rows.old_logprobs, rows.advantages, mask, ppo.clip_low,
                                   clip_range_high=ppo.clip_high, dual_clip=ppo.dual_clip,
                                   aggregate=aggregate)
        # During critic warm-up the actor term is kept at weight 0 so that every trainable
        # parameter stays in the graph (DDP expects that) while only the critic learns.
        terms.append((1.0 if train_actor else 0.0) * _actor_loss(pg, aggregate(entropy, mask), ppo))
        stats.update(policy_loss=float(pg.detach()), entropy=float(masked_mean(entropy.detach(), mask)),
                     clip_frac=float(pg_stats["clip_frac"]), approx_kl=float(pg_stats["approx_kl"]))
        if ppo.dual_clip is not None:
            stats["dual_clip_frac"] = float(pg_stats["dual_clip_frac"])
    if values is not None:
        vf, vf_stats = value_loss(values, rows.old_values, rows.returns, mask, ppo.clip_range_value,
                                  aggregate=aggregate)
        terms.append(vf_coef * vf)
        stats.update(value_loss=float(vf.detach()), vf_clip_frac=float(vf_stats["vf_clip_frac"]))
    loss = share * sum(terms[1:], terms[0])
    if ptx is not None:
        loss = loss + ptx_share * ppo.ptx_coef * outputs[3]
        stats["ptx_loss"] = float(outputs[3].detach())
    return loss, stats


def _actor_loss(pg: torch.Tensor, entropy: torch.Tensor, ppo: PPOSection) -> torch.Tensor:
    """The policy loss, minus PPO-max's entropy bonus ppo.entropy_coef x the entropy, aggregated
    as the policy loss is (token-mean by default; minimising the loss raises the entropy; the
    arrangement then gives entropy a gradient)."""
    return pg - ppo.entropy_coef * entropy if ppo.entropy_coef else pg


def _tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.detach().sum().to(torch.float64)


def _global_tokens(mask: torch.Tensor, backend, units=_tokens) -> torch.Tensor:
    return backend.all_reduce_sum(units(mask)).clamp(min=1.0)


def _share(mask: torch.Tensor, global_tokens: torch.Tensor, backend, units=_tokens) -> float:
    """This micro-batch's tokens over the mean tokens per rank of the whole minibatch.

    The losses are token-means over a micro-batch's rows, and DDP/ZeRO average the ranks'
    gradients; scaled by this share and summed over the micro-batches, that is the gradient
    of the token-mean over the whole minibatch of all ranks, as one process computes it in
    one forward. (One micro-batch on one process: 1.) `units`: what the loss is a mean of
    (`ppo.loss_aggregation`, algorithms/aggregation.py): tokens, or responses.
    """
    return float(units(mask) * backend.world_size / global_tokens)


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


@dataclasses.dataclass(frozen=True)
class _Passes:
    """What every micro-batch of one minibatch runs: its forward/backward passes (BOTH_PASSES,
    or ACTOR_PASS then CRITIC_PASS where the critic runs apart) and the loss settings."""

    wrapped: torch.nn.Module
    ppo: PPOSection
    backend: object
    vf_coef: float
    train_actor: bool
    parts: tuple[str, ...]


def _run_passes(run: _Passes, rows: Experience, ptx: dict | None, share: float, ptx_share: float,
                last_micro_batch: bool) -> tuple[list[dict], bool] | None:
    """One micro-batch's passes, each a forward and its backward: ([stats of each pass], any
    loss NaN/inf), or None where a NaN/inf loss must stop the update before its backward.

    Apart (1base-2lora), the actor pass (policy and SFT terms) is backpropagated, freeing its
    activations, before the critic pass (value loss) runs its forward: only one body's
    activations are alive at a time. Each weight gets its gradient from one pass only, so the
    gradients are those of the summed loss of one pass. The backends accumulate both
    backwards into one micro-batch (`accumulating(partial=...)`, `backward(last_pass=...)`).
    """
    backend, found_bad, stats_of_passes = run.backend, False, []
    apart = len(run.parts) > 1
    for part in run.parts:
        last_pass = part == run.parts[-1]
        with backend.accumulating(not (last_micro_batch and last_pass), partial=apart), backend.autocast():
            loss, stats = minibatch_loss(run.wrapped, rows, run.ppo, run.vf_coef, run.train_actor,
                                         None if part == CRITIC_PASS else ptx, share, ptx_share, part)
            if _bad(loss, backend):
                if not backend.can_skip_steps:
                    return None  # DeepSpeed would apply it: never call its backward
                found_bad = True
            backend.backward(loss, last_pass=last_pass)
        del loss  # the pass's graph and activations go before the next pass's forward
        stats_of_passes.append(stats)
    return stats_of_passes, found_bad


def minibatch_update(wrapped, experience: Experience, index: torch.Tensor, ptx: dict | None, ppo: PPOSection,
                     backend, vf_coef: float, train_actor: bool, totals: dict,
                     critic_apart: bool = False) -> tuple[bool, float]:
    """One optimizer step on one minibatch, a micro-batch at a time; (applied, grad norm).

    Every micro-batch's forward and backward run (DDP expects each backward; only the last
    one synchronises gradients), then the step is taken or, when any loss was NaN/inf,
    dropped. DeepSpeed applies the update inside its backward, so there a NaN/inf loss
    stops before its backward. The stats are added to `totals`, weighted by token share,
    only for an applied step. With `critic_apart` (the arrangement's: 1base-2lora) each
    micro-batch runs as an actor pass then a critic pass (`_run_passes`).
    """
    pieces = index.split(ppo.micro_batch_size or ppo.mini_batch_size)
    _, units = aggregation(ppo.loss_aggregation)  # tokens, or responses (DAPO / Dr. GRPO)
    minibatch_tokens = _global_tokens(experience.response_mask[index], backend, units)
    ptx_parts = _split_ptx(ptx, len(pieces))
    ptx_tokens = _global_tokens(_ptx_tokens(ptx), backend) if ptx is not None else None
    parts = (ACTOR_PASS, CRITIC_PASS) if critic_apart else (BOTH_PASSES,)
    run = _Passes(wrapped, ppo, backend, vf_coef, train_actor, parts)
    bad, weighted = False, []
    for i, (rows_index, ptx_part) in enumerate(zip(pieces, ptx_parts, strict=True)):
        rows = experience.select(rows_index)
        share = _share(rows.response_mask, minibatch_tokens, backend, units)
        ptx_share = _share(_ptx_tokens(ptx_part), ptx_tokens, backend) if ptx_part is not None else 1.0
        done = _run_passes(run, rows, ptx_part, share, ptx_share, i == len(pieces) - 1)
        if done is None:
            return False, float("nan")
        bad = bad or done[1]
        weighted += [(stats, share, ptx_share) for stats in done[0]]
    if bad:  # as the shared loop does: every backward ran, then the gradients are dropped
        backend.skip_step()
        return False, float("nan")
    if not train_actor:
        drop_actor_gradients(wrapped)
    grad_norm = backend.optimizer_step()
    if backend.skipped_step:
        return False, grad_norm
    for stats, share, ptx_share in weighted:
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value * (ptx_share if key == "ptx_loss" else share)
    return True, grad_norm


class PPOUpdate:
    """The updates of every iteration, built once per run.

    Iteration `index` (0-based) shuffles with seed `seed·100003 + index`, trains the actor
    from iteration `ppo.critic_warmup_steps` on, and numbers its updates from
    `index · updates_per_iteration` (update u's ptx batch is `ptx_batches(u)`). Each update is
    recorded in `bad_steps` (engine/bad_steps.BadSteps); `ema` (ema.ActorEMA) follows every
    applied one. `critic_apart`: the arrangement's (actor and critic in passes of their own).
    """

    def __init__(self, wrapped, ppo: PPOSection, backend, scheduler, *, vf_coef: float,
                 updates_per_iteration: int = 1, seed: int = 0, ptx_batches=None, bad_steps=None, ema=None,
                 critic_apart: bool = False):
        self.wrapped, self.ppo, self.backend, self.scheduler = wrapped, ppo, backend, scheduler
        self.critic_apart = critic_apart
        self.vf_coef, self.updates_per_iteration, self.seed = vf_coef, updates_per_iteration, seed
        self.ptx_batches, self.bad_steps, self.ema = ptx_batches, bad_steps, ema

    def __call__(self, experience: Experience, index: int) -> dict:
        """Means over the applied updates (token-means over all ranks' minibatches); {} if none was."""
        ppo, rows = self.ppo, experience.input_ids.shape[0]
        train_actor = index >= ppo.critic_warmup_steps
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        totals: dict[str, float] = {}
        applied_count, grad_norm, update = 0, 0.0, index * self.updates_per_iteration
        self.wrapped.train()
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(rows, generator=generator).to(experience.input_ids.device)
            for minibatch in order.split(ppo.mini_batch_size):
                # No SFT term during critic warm-up: it would train the actor.
                ptx = self.ptx_batches(update) if self.ptx_batches is not None and train_actor else None
                applied, norm = self._minibatch(experience, minibatch, ptx, train_actor, totals)
                release_freed_memory()  # the minibatch's activations and gradients (engine/memory.py)
                self.scheduler.step()
                update += 1
                if self.bad_steps is not None:
                    self.bad_steps.record(not applied, index + 1)
                if applied:
                    if self.ema is not None:
                        self.ema.update()
                    grad_norm += norm
                    applied_count += 1
        if not applied_count:  # every update skipped (the same on every rank)
            return {}
        return self._means(totals, applied_count, grad_norm, experience, train_actor)

    def _minibatch(self, experience: Experience, index: torch.Tensor, ptx: dict | None, train_actor: bool,
                   totals: dict) -> tuple[bool, float]:
        return minibatch_update(self.wrapped, experience, index, ptx, self.ppo, self.backend,
                                self.vf_coef, train_actor, totals, self.critic_apart)

    def _means(self, totals: dict, count: int, grad_norm: float, experience: Experience,
               train_actor: bool) -> dict:
        # Every rank logs the same numbers: the token-means over all ranks' minibatches.
        ppo, backend = self.ppo, self.backend
        summed = global_sums(backend, totals)
        means = {k: summed[k] / (count * backend.world_size) for k in sorted(totals)}
        means["loss"] = ((1.0 if train_actor else 0.0) * means["policy_loss"]
                         + self.vf_coef * means.get("value_loss", 0.0)
                         + ppo.ptx_coef * means.get("ptx_loss", 0.0))
        if ppo.entropy_coef and train_actor:  # PPO-max's entropy bonus
            means["loss"] -= ppo.entropy_coef * means["entropy"]
        means["grad_norm"] = grad_norm / count
        if experience.old_values is not None:
            means["explained_variance"] = float(explained_variance(
                experience.old_values, experience.returns, experience.response_mask,
                reduce=summed_over_processes(backend)))
        return means


def updates_per_iteration(ppo: PPOSection) -> int:
    """Optimizer steps per iteration on each process: epochs × minibatches of its responses."""
    responses = ppo.rollout_batch_size * ppo.samples_per_prompt
    return ppo.ppo_epochs * math.ceil(responses / ppo.mini_batch_size)
