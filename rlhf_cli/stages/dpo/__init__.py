"""DPO and its family on preference pairs.

Δ = [logπ(y_w) − logπ_ref(y_w)] − [logπ(y_l) − logπ_ref(y_l)], loss e.g. −log σ(βΔ).
The reference is the same model with its LoRA adapter disabled (no second copy), a
frozen copy for full fine-tuning, or log-probs computed once before training
(`dpo.precompute_ref`). Chosen and rejected go through one concatenated forward, and
only response positions go through the output head.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ...algorithms.preference import DPOFamilyLoss, preference_loss
from ...data.loaders import load_pairs
from ...engine.final_model import save_final_model
from ...engine.loop import StageData, StageTask, Trainer
from ...engine.progress import say
from ...engine.run_dir import FINAL
from ...engine.runner import finish_run, run_stage
from ...engine.scoring import policy_scorer
from ...engine.stage import StageParts
from ...models.policy import tokenizer_for
from ...schema import Recipe
from .kto import kto_parts
from .objective import DPOObjective, collate_pairs, dpo_objective, dpo_step_loss, halves
from .online import OnlineDPO


@torch.no_grad()
def precompute_reference(objective: DPOObjective, examples, collate, backend, batch_size: int) -> None:
    """Reference log-probs once per pair, sharded over ranks and summed to all.

    A table of 2 floats a pair (16 MB per million), not a dict: each rank fills its own
    pairs, and the others' zeros leave them unchanged in the sum.
    """
    table = torch.zeros(len(examples), 2, dtype=torch.float64)
    mine = range(backend.rank, len(examples), backend.world_size)
    for start in range(0, len(mine), batch_size):
        indices = list(mine[start:start + batch_size])
        batch = collate([examples[i] for i in indices])
        args = [batch[k].to(backend.device) for k in ("input_ids", "attention_mask", "labels")]
        chosen, rejected = halves(objective(*args, reference=True)[0].double().cpu())
        table[indices, 0], table[indices, 1] = chosen, rejected
    if backend.world_size > 1:
        table = backend.all_reduce_sum(table.to(backend.device)).cpu()
    for index, (chosen, rejected) in enumerate(table.tolist()):
        examples[index]["ref_chosen_logps"] = chosen
        examples[index]["ref_rejected_logps"] = rejected


def _pair_parts(recipe: Recipe, tokenizer, backend, loss: DPOFamilyLoss) -> StageData:
    """Pairs, collate, weight and loss of the paired losses, for the shared loop."""
    data = recipe.data
    return StageData(
        train_examples=load_pairs(recipe, tokenizer, data.train, "data.train", backend),
        eval_examples=(load_pairs(recipe, tokenizer, data.eval, "data.eval", backend)
                       if data.eval else None),
        collate=partial(collate_pairs, pad_token_id=tokenizer.pad_token_id),
        batch_weight=lambda batch: batch["input_ids"].shape[0] // 2,
        loss_fn=partial(dpo_step_loss, loss=loss),
        weight_name="pairs",
    )


def _offline_parts(recipe: Recipe, tokenizer, backend) -> tuple[torch.nn.Module, StageParts]:
    """Offline DPO (and KTO) on the shared loop: the prepared model and the runner's parts."""
    cfg, loss = recipe.dpo, preference_loss(recipe.dpo)
    parts = (_pair_parts if loss.paired else kto_parts)(recipe, tokenizer, backend, loss)
    task = StageTask(model=dpo_objective(recipe, loss, backend), data=parts,
                     evaluate_extra=policy_scorer(recipe, tokenizer, backend), title=f"dpo ({cfg.loss_type})")
    trainer = Trainer(recipe, task, backend)
    if cfg.precompute_ref and loss.needs_reference:
        size = recipe.train.eval_batch_size or recipe.train.batch_size
        for examples in filter(None, (parts.train_examples, parts.eval_examples)):
            precompute_reference(backend.unwrap(trainer.model), examples, parts.collate, backend, size)
        say(backend, "reference log-probs precomputed")
    return trainer.model, trainer.parts()


def run_dpo(recipe: Recipe, run_dir: Path, backend, resume: bool = False) -> dict:
    tokenizer = tokenizer_for(recipe)
    if recipe.dpo.online:
        online = OnlineDPO(recipe, tokenizer, backend)
        model, parts = online.model, online.parts()
    else:
        model, parts = _offline_parts(recipe, tokenizer, backend)
    last_eval = run_stage(recipe, backend, run_dir, parts, resume)
    final = save_final_model(backend, model, lambda m: m.lm, tokenizer, run_dir / FINAL)
    return finish_run(backend, run_dir, final, last_eval)
