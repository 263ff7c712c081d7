"""Online DPO: `rlhf dpo` with `dpo.online: true`.

Each step, for this process's prompts of the step (data.train read as PPO reads prompts; the
order a function of the step, engine/batching.py): sample `dpo.samples_per_prompt` responses
per prompt from the current policy, score them with the judge (`dpo.reward_fn` or
`dpo.reward_model`), pair each prompt's best (chosen) with its worst (rejected), skip prompts
whose samples all tie, and take one DPO step on the pairs with offline DPO's loss and
objective: the reference is the base with the adapter off, or a frozen copy under full
fine-tuning. Sampling draws from its own seeded stream (engine/rollout.py), whose state every
checkpoint keeps, so `--resume` samples what an uninterrupted run would have.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from ...algorithms.preference import DPOFamilyLoss, preference_loss
from ...data.collate import pad_pairs
from ...data.loaders import load_prompts
from ...engine.bad_steps import BadSteps
from ...engine.batching import GlobalBatches
from ...engine.judge import make_judge
from ...engine.loop import StageData, diverged
from ...engine.memory import memory_metrics
from ...engine.optim import build_optimizer, build_scheduler
from ...engine.reduce import global_sums
from ...engine.rollout import PlainPolicy, decode_responses, sample, seed_sampling_stream
from ...engine.scoring import policy_scorer
from ...engine.stage import StageParts
from ...engine.train_step import train_step
from ...schema import Recipe
from .objective import dpo_objective, dpo_step_loss
from .pairing import best_and_worst, pair_example

# The counts a step sums over every process's micro-batches, for its row.
COUNTS = ("prompts", "skipped", "pairs", "samples", "score", "score_chosen", "score_rejected",
          "response_tokens")


def collate_online_pairs(examples: list[dict], pad_token_id: int) -> dict:
    """Pairs as offline DPO pads them, plus `pair_weight` [B]: 0 for a stand-in pair."""
    batch = pad_pairs(examples, pad_token_id)
    batch["pair_weight"] = torch.tensor([0.0 if e.get("stand_in") else 1.0 for e in examples])
    return batch


def online_step_loss(model, batch, *, loss: DPOFamilyLoss):
    """Offline DPO's step loss; a stand-in pair (a micro-batch whose prompts all tied) adds no
    gradient and no metrics, but keeps every process's forward/backward count equal."""
    total, metrics = dpo_step_loss(model, batch, loss=loss)
    if float(batch["pair_weight"].sum()) == 0:
        return total * 0.0, {key: 0.0 for key in metrics}
    return total, metrics


class OnlineDPO:
    def __init__(self, recipe: Recipe, tokenizer, backend):
        self.recipe, self.cfg, self.train, self.backend = recipe, recipe.dpo, recipe.train, backend
        self.loss, self.tokenizer = preference_loss(self.cfg), tokenizer
        self.prompts = load_prompts(recipe, tokenizer, backend, section="dpo")
        objective = dpo_objective(recipe, self.loss, backend)
        # Before the wrapping: an RM trained on the policy's base joins it as a frozen adapter.
        self.judge = make_judge(self.cfg.reward_fn, self.cfg.reward_model, key_prefix="dpo",
                                model_section=recipe.model, tokenizer=tokenizer, policy=objective.lm)
        self.batches = GlobalBatches(len(self.prompts), self.train.batch_size, self.train.grad_accum,
                                     backend.world_size, backend.rank, self.train.seed)
        self.total_steps = self.batches.total_steps(self.train.epochs, self.train.max_steps)
        self.model = backend.prepare(objective, build_optimizer(objective.parameters(), self.train))
        self.scheduler = build_scheduler(backend.optimizer, self.train, self.total_steps)
        self.bad_steps = BadSteps(self.train.max_bad_steps, backend.can_skip_steps, diverged)
        self.scorer = policy_scorer(recipe, tokenizer, backend)
        self.collate = partial(collate_online_pairs, pad_token_id=tokenizer.pad_token_id)
        self.loss_fn = partial(online_step_loss, loss=self.loss)
        seed_sampling_stream(self.train.seed, backend.rank)  # after building: see its docstring

    def parts(self) -> StageParts:
        return StageParts(
            title=f"online dpo ({self.cfg.loss_type})", unit="step", total_steps=self.total_steps,
            scheduler=self.scheduler, step=self.step, evaluate=self.evaluate, bad_steps=self.bad_steps,
            shown=("loss", "score/chosen", "score/rejected", "skipped_share", "rewards/margins"),
            evaluates_at_ends=self.scorer is not None)

    # ------------------------------------------------------------------ one step
    def step(self, index: int) -> dict:
        tic = time.perf_counter()
        micro = [self.sample_pairs(indices) for indices in self.batches.micro_batches(index)]
        counts = {key: 0.0 for key in COUNTS}
        for _, stats in micro:
            counts = {key: counts[key] + stats[key] for key in COUNTS}
        counts = global_sums(self.backend, counts)
        sampled = time.perf_counter()
        row = {"step": index + 1, "epoch": round(self.batches.epoch_of(index + 1), 4),
               **self._update([pairs for pairs, _ in micro], counts, index + 1)}
        row.update(summarise(counts))
        row.update({"time_sample": sampled - tic, "time_train": time.perf_counter() - sampled,
                    **memory_metrics()})
        if self.bad_steps.total:
            row["skipped_steps"] = self.bad_steps.total
        return row

    def sample_pairs(self, prompt_indices: list[int]) -> tuple[list[dict], dict]:
        """Pairs of this micro-batch's prompts (a stand-in when none), and its counts. The judge
        refuses NaN/inf scores and a wrong count (engine/judge.py)."""
        prompts = [self.prompts[i] for i in prompt_indices]
        k = self.cfg.samples_per_prompt
        policy = PlainPolicy(self.backend.unwrap(self.model).lm)
        rollout = sample(policy, [p for p in prompts for _ in range(k)], self.tokenizer, self.cfg,
                         self.backend.device, synced=self.backend.world_size > 1)
        scores = self.judge(rollout, decode_responses(rollout, self.tokenizer))
        scores = scores.tolist()
        tokens = [t[m.bool()].tolist() for t, m in zip(rollout.tokens, rollout.response_mask, strict=True)]
        kept = [(n, pick) for n, pick in enumerate(best_and_worst(scores, k)) if pick is not None]
        pairs = [pair_example(prompts[n]["prompt_input_ids"], tokens[best], tokens[worst])
                 for n, (best, worst) in kept]
        stats = {"prompts": len(prompts), "skipped": len(prompts) - len(kept), "pairs": len(pairs),
                 "samples": len(scores), "score": sum(scores),
                 "score_chosen": sum(scores[best] for _, (best, _) in kept),
                 "score_rejected": sum(scores[worst] for _, (_, worst) in kept),
                 "response_tokens": float(rollout.response_mask.sum())}
        if not pairs:
            pairs = [{**pair_example(prompts[0]["prompt_input_ids"], tokens[0], tokens[0]), "stand_in": True}]
        return pairs, stats

    def _update(self, micro_pairs: list[list[dict]], counts: dict, done: int) -> dict:
        """One DPO step on the pairs; none anywhere (every prompt tied): no update, the schedule
        moves on (lr stays a function of the step)."""
        if not counts["pairs"]:
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            return {"lr": lr}
        flat, micro_indices = [], []
        for pairs in micro_pairs:
            micro_indices.append(list(range(len(flat), len(flat) + len(pairs))))
            flat.extend(pairs)
        data = StageData(train_examples=flat, collate=self.collate, loss_fn=self.loss_fn,
                         batch_weight=lambda batch: float(batch["pair_weight"].sum()))
        row = train_step(self.model, data, micro_indices, self.backend, self.scheduler)
        row.pop("_weight")
        bad = row.pop("_bad")
        self.bad_steps.record(bad, done)
        if bad:  # the step was skipped: its numbers describe no update
            return {"lr": row["lr"]}
        return row

    def evaluate(self, step: int) -> dict:
        if self.scorer is None:
            return {}
        return {"step": step, "split": "eval", **self.scorer(self.backend.unwrap(self.model))}


def summarise(counts: dict) -> dict:
    """The step's judge figures: mean score of all samples, of the chosen and rejected ones,
    the share of prompts skipped (all samples tied), pairs, mean response length."""
    pairs = counts["pairs"]
    samples = counts["samples"]
    row = {"score": counts["score"] / samples, "skipped_share": counts["skipped"] / counts["prompts"],
           "pairs": pairs, "response_length": counts["response_tokens"] / samples}
    if pairs:
        row["score/chosen"] = counts["score_chosen"] / pairs
        row["score/rejected"] = counts["score_rejected"] / pairs
    return row
