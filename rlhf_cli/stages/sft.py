"""Supervised fine-tuning: next-token cross-entropy on the response tokens.

loss = sum over trained tokens of -log p(token | prefix) / number of trained tokens in
the global batch (the engine does the division, so accumulation is exact).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ..data.collate import pad_batch
from ..data.loaders import load_sft
from ..engine.final_model import save_final_model
from ..engine.loop import StageData, StageTask, Trainer
from ..engine.run_dir import FINAL
from ..engine.runner import finish_run, run_stage
from ..engine.scoring import policy_scorer
from ..models.policy import policy_model, tokenizer_for
from ..models.sft_objective import SFTObjective, sft_loss, trained_tokens
from ..schema import Recipe


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
    return finish_run(backend, run_dir, final, last_eval)
