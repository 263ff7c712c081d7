"""Reward model: a scalar head on the last real token, trained on preference pairs.

loss = −log σ(r(x, y_w) − r(x, y_l) − margin) + λ·(r_w + r_l)² + μ·NLL(y_w), averaged over
pairs; NLL(y_w) is the chosen response's mean token loss under the base's own (frozen) LM
head on the RM's hidden states (`rm.lm_loss_weight` = μ), which keeps the body a language
model while it learns to score.
The eval set's reward mean and std are stored with the model (`reward_stats.json`) so
that PPO can normalise scores.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch

from ..algorithms.preference import pairwise_reward_loss
from ..data.collate import pad_pairs
from ..data.loaders import load_pairs
from ..engine.final_model import save_final_model
from ..engine.loop import StageData, StageTask, Trainer
from ..engine.plots import plot_run
from ..engine.progress import console, say
from ..engine.run_dir import FINAL
from ..engine.runner import run_stage
from ..errors import UserError
from ..models.dropout import apply_dropout_setting
from ..models.lm_forward import inner_causal_lm, shifted_targets, token_logprobs
from ..models.loading import add_lora, count_parameters, resolve_base
from ..models.logits import LogitTransform
from ..models.policy import tokenizer_for
from ..models.reward import base_lm_head, decoder_states, scores_from_states
from ..models.reward_loading import load_sequence_classifier
from ..schema import Recipe

REWARD_STATS = "reward_stats.json"
TRAIN_STATS_PAIRS = 512  # without data.eval, the stored statistics come from this many training pairs


class RewardObjective(torch.nn.Module):
    """One forward over chosen and rejected rows together: rewards [2B] (and, with an LM head,
    the mean token NLL of each row's labelled tokens [2B])."""

    def __init__(self, model, lm_head: torch.Tensor | None = None):
        super().__init__()
        self.rm = model
        # Frozen, never saved, and not a buffer: DDP would broadcast a buffer at every forward.
        self.lm_head = lm_head

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = decoder_states(self.rm, input_ids, attention_mask)
        rewards = scores_from_states(self.rm, hidden, attention_mask)
        if labels is None or self.lm_head is None:
            return rewards, None
        if self.lm_head.device != hidden.device:
            self.lm_head = self.lm_head.to(hidden.device)
        return rewards, response_nll(hidden, input_ids, labels, self.lm_head,
                                     inner_causal_lm(self.rm).config)


def response_nll(hidden, input_ids, labels, lm_head: torch.Tensor, config=None) -> torch.Tensor:
    """Mean NLL per row [B] of the labelled tokens, with logits only where there are labels."""
    targets, mask = shifted_targets(input_ids, labels)
    # The family's final transform (soft-cap, scale) from the config: there is no LM forward here
    # to probe (models/logits.py), the body is a sequence classifier.
    logits = LogitTransform.from_config(config)(hidden[:, :-1][mask] @ lm_head.to(hidden.dtype).T)
    per_token = -token_logprobs(logits, targets[mask])
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(input_ids.shape[0], dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, rows, per_token) / mask.sum(dim=1).clamp(min=1)


def pair_count(batch: dict) -> int:
    return batch["input_ids"].shape[0] // 2


def split_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def rm_loss(model, batch, *, margin: float, center_weight: float, lm_loss_weight: float = 0.0):
    labels = batch["labels"] if lm_loss_weight else None
    rewards, nll = model(batch["input_ids"], batch["attention_mask"], labels)
    chosen, rejected = split_pairs(rewards)
    losses = pairwise_reward_loss(chosen, rejected, margin=margin, center_weight=center_weight)
    lm_metrics = {}
    if nll is not None:
        chosen_nll = split_pairs(nll)[0]
        losses = losses + lm_loss_weight * chosen_nll
        lm_metrics["lm_loss"] = float(chosen_nll.detach().sum())
    chosen, rejected = chosen.detach(), rejected.detach()
    detached = torch.cat([chosen, rejected])
    metrics = {
        "accuracy": float((chosen > rejected).sum()),  # ties count as wrong
        "margin": float((chosen - rejected).sum()),
        "reward_chosen": float(chosen.sum()),
        "reward_rejected": float(rejected.sum()),
        # Per pair: the mean of its two rewards and of their squares, for the std.
        "reward_mean": float(detached.sum() / 2),
        "reward_sq": float((detached ** 2).sum() / 2),
        **lm_metrics,
    }
    return losses.sum(), metrics


def reward_model(recipe: Recipe, tokenizer, announce: bool):
    source = resolve_base(recipe.model.base)
    model = load_sequence_classifier(recipe.model, source, tokenizer.pad_token_id)
    if recipe.model.lora is None and hasattr(model, "lm_head_is_linear"):  # a ScoredCausalLM
        raise UserError(f"{recipe.model.base} has no sequence-classification class of its own, so a "
                        "reward model on it is a LoRA adapter plus a score head: set model.lora",
                        where="model.lora")
    if recipe.model.lora is not None:
        # peft keeps the `score` head trainable and saves it with the adapter (SEQ_CLS).
        model = add_lora(model, recipe.model.lora, task_type="SEQ_CLS")
    apply_dropout_setting(model, recipe, announce)
    if announce:
        trainable, total = count_parameters(model)
        console.print(f"reward model: {recipe.model.base}  trainable {trainable:,} / {total:,}")
    return model


def reward_stats(row: dict, source: str) -> dict:
    """Mean and std of the rewards from the eval metrics (E[r] and E[r²] per pair)."""
    mean = row["reward_mean"]
    variance = max(row["reward_sq"] - mean ** 2, 0.0)
    return {"mean": mean, "std": math.sqrt(variance), "accuracy": row.get("accuracy"),
            "source": source}


def run_rm(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    tokenizer = tokenizer_for(recipe)
    train_pairs = load_pairs(recipe, tokenizer, recipe.data.train, "data.train", backend)
    eval_pairs = (load_pairs(recipe, tokenizer, recipe.data.eval, "data.eval", backend)
                  if recipe.data.eval else None)
    model = reward_model(recipe, tokenizer, backend.is_main)
    lm_head = (base_lm_head(resolve_base(recipe.model.base), inner_causal_lm(model))
               if recipe.rm.lm_loss_weight else None)
    task = StageTask(
        model=RewardObjective(model, lm_head),
        data=StageData(
            train_examples=train_pairs, eval_examples=eval_pairs,
            collate=partial(pad_pairs, pad_token_id=tokenizer.pad_token_id), batch_weight=pair_count,
            loss_fn=partial(rm_loss, margin=recipe.rm.margin, center_weight=recipe.rm.center_weight,
                            lm_loss_weight=recipe.rm.lm_loss_weight),
            weight_name="pairs"),
        title="rm",
    )
    trainer = Trainer(recipe, task, backend)
    last_eval = run_stage(recipe, backend, run_dir, trainer.parts(), resume)
    stats_row = last_eval
    if not stats_row:  # no eval data: the statistics come from training pairs
        trainer.data.eval_examples = train_pairs[:TRAIN_STATS_PAIRS]
        stats_row = trainer.evaluate(trainer.total_steps)
    stats = json.dumps(reward_stats(stats_row, "eval" if last_eval else "train"), indent=1)
    final = save_final_model(backend, trainer.model, lambda m: m.rm, tokenizer, run_dir / FINAL,
                             prefix="rm.", extra_files={REWARD_STATS: stats})
    if backend.is_main:
        plot_run(run_dir)
        origin = stats_origin(stats_row, eval_pairs if last_eval else None, train_pairs)
        say(backend, f"saved {final}: {origin}")
    return {k: v for k, v in last_eval.items() if k not in ("step", "split")}


def stats_origin(row: dict, eval_pairs: list | None, train_pairs: list) -> str:
    """Which pairs the stored accuracy and reward statistics were measured on."""
    if eval_pairs is not None:
        return f"accuracy {row['accuracy']:.3f} on {len(eval_pairs)} held-out pairs"
    counted = min(len(train_pairs), TRAIN_STATS_PAIRS)
    return f"accuracy {row['accuracy']:.3f} on {counted} training pairs (no data.eval)"
