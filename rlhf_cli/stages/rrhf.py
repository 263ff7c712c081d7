"""RRHF (Yuan et al. 2023) on K scored responses per prompt: `rlhf rrhf`.

Each step takes `train.batch_size` prompts with all their responses (`rlhf generate` output, or
preference pairs as K = 2), scores every response by the policy's log-probability through one
forward, and descends w·L_rank + L_ft (algorithms/rrhf.py). No reference model and no sampling:
the ranking comes from the data. The loss is the mean over the global batch's prompts.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..algorithms.rrhf import rrhf_loss
from ..data.loaders import load_ranked
from ..data.ranked import pad_ranked
from ..engine.final_model import save_final_model
from ..engine.loop import StageData, StageTask, Trainer
from ..engine.run_dir import FINAL
from ..engine.runner import finish_run, run_stage
from ..engine.scoring import policy_scorer
from ..models.lm_forward import sequence_logprobs
from ..models.policy import policy_model, tokenizer_for
from ..schema import Recipe, RRHFSection


class RRHFObjective(torch.nn.Module):
    """Summed response log-probs and token counts through the wrapper's forward (DDP/DeepSpeed
    see one forward), on the one exact log-prob path (every family's logit transform)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels):
        return sequence_logprobs(self.lm, input_ids, attention_mask, labels)


def rrhf_step_loss(model, batch: dict, *, section: RRHFSection):
    """The summed per-prompt RRHF loss of a micro-batch, and its summed metrics."""
    logps, counts = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    terms = rrhf_loss(logps, counts, batch["scores"], batch["groups"], batch["num_prompts"],
                      rank_weight=section.rank_weight, length_penalty=section.length_penalty)
    metrics = {
        "rank_loss": float(terms.rank.detach().sum()),
        "sft_loss": float(terms.sft.detach().sum()),
        "_pairs": float(terms.pairs.sum()),
        "_misordered": float(terms.misordered.sum()),
    }
    return terms.loss.sum(), metrics


def finish_rrhf_metrics(row: dict) -> dict:
    """`rank_accuracy`: the share of the ordered pairs whose log-probs the policy orders as their
    scores are (from the summed counts; absent when no pair was ordered)."""
    row = dict(row)
    pairs, misordered = row.pop("_pairs", 0.0), row.pop("_misordered", 0.0)
    if pairs > 0:
        row["rank_accuracy"] = 1.0 - misordered / pairs
    return row


def rrhf_data(recipe: Recipe, tokenizer, backend) -> StageData:
    data = recipe.data
    return StageData(
        train_examples=load_ranked(recipe, tokenizer, data.train, "data.train", backend),
        eval_examples=load_ranked(recipe, tokenizer, data.eval, "data.eval", backend) if data.eval else None,
        collate=partial(pad_ranked, pad_token_id=tokenizer.pad_token_id),
        batch_weight=lambda batch: batch["num_prompts"],
        loss_fn=partial(rrhf_step_loss, section=recipe.rrhf),
        finish_metrics=finish_rrhf_metrics,
        weight_name="prompts",
    )


def run_rrhf(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    tokenizer = tokenizer_for(recipe)
    data = rrhf_data(recipe, tokenizer, backend)
    lm = policy_model(recipe, announce=backend.is_main)
    task = StageTask(model=RRHFObjective(lm), data=data,
                     evaluate_extra=policy_scorer(recipe, tokenizer, backend), title="rrhf")
    trainer = Trainer(recipe, task, backend)
    last_eval = run_stage(recipe, backend, run_dir, trainer.parts(), resume)
    final = save_final_model(backend, trainer.model, lambda m: m.lm, tokenizer, run_dir / FINAL)
    return finish_run(backend, run_dir, final, last_eval)
