"""Supervised fine-tuning: next-token cross-entropy on the response tokens.

loss = sum over trained tokens of -log p(token | prefix) / number of trained tokens in
the global batch (the engine does the division, so accumulation is exact).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.collate import pad_batch
from ..data.loaders import load_sft
from ..engine.final_model import save_final_model
from ..engine.loop import StageData, StageTask, Trainer
from ..engine.plots import plot_run
from ..engine.progress import say
from ..engine.run_dir import FINAL
from ..engine.runner import run_stage
from ..engine.scoring import policy_scorer
from ..models.lm_forward import selected_logits, shifted_targets
from ..models.policy import policy_model, tokenizer_for
from ..schema import Recipe


class SFTObjective(torch.nn.Module):
    """Wraps the LM so that DDP/DeepSpeed see one forward that returns the summed loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels):
        targets, mask = shifted_targets(input_ids, labels)
        logits = selected_logits(self.lm, input_ids, attention_mask, mask)
        return F.cross_entropy(logits.float(), targets[mask], reduction="sum")


def trained_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def sft_loss(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"]), {}


def run_sft(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    tokenizer = tokenizer_for(recipe)
    train_examples = load_sft(recipe, tokenizer, recipe.data.train, "data.train", backend)
    eval_examples = (load_sft(recipe, tokenizer, recipe.data.eval, "data.eval", backend)
                     if recipe.data.eval else None)
    lm = policy_model(recipe, announce=backend.is_main)
    scorer = policy_scorer(recipe, tokenizer, backend)
    task = StageTask(
        model=SFTObjective(lm),
        data=StageData(train_examples=train_examples, eval_examples=eval_examples,
                       collate=partial(pad_batch, pad_token_id=tokenizer.pad_token_id),
                       batch_weight=trained_tokens, loss_fn=sft_loss),
        evaluate_extra=scorer,
        title="sft",
    )
    trainer = Trainer(recipe, task, backend)
    last_eval = run_stage(recipe, backend, run_dir, trainer.parts(), resume)
    final = save_final_model(backend, trainer.model, lambda m: m.lm, tokenizer, run_dir / FINAL)
    if backend.is_main:
        plot = plot_run(run_dir)
        say(backend, f"saved {final}" + (f"; curves in {plot}" if plot else ""))
    return {k: v for k, v in last_eval.items() if k not in ("step", "split")}
