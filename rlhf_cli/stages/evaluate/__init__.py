"""`rlhf eval`: held-out preference accuracy of a reward model or a policy, and optionally
generations scored by a reward model or function.

- reward model: share of pairs with reward(chosen) > reward(rejected) (ties wrong);
- policy: share of pairs whose implicit DPO reward β·[log π/π_ref] prefers chosen, the
  reference being the base with the adapter disabled (or `--reference`);
- `--generate`: sample answers from the policy and the reference for the pairs' prompts,
  score both: mean reward, KL to the reference, win rate against the reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import load_resolved
from ...data.collate import pad_pairs
from ...data.preference import build_preference_dataset
from ...data.sources import load_source
from ...engine.progress import console
from ...engine.run_dir import FINAL, RECIPE, write_atomic
from ...errors import UserError
from .loaded import LoadedModel, load_for_eval
from .report import write_markdown, write_plots


@dataclass
class EvalSettings:
    template: str = "plain"
    max_length: int = 512
    max_prompt_length: int | None = None
    beta: float = 0.1
    batch_size: int = 16
    num_prompts: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0  # sampling seed for --generate


def settings_for(model_source: str, overrides: dict) -> EvalSettings:
    """Template and lengths from the run's own recipe when evaluating a run directory."""
    settings = EvalSettings()
    recipe_file = Path(model_source) / RECIPE
    if recipe_file.is_file():
        recipe = load_resolved(recipe_file)
        settings.template, settings.max_length = recipe.data.template, recipe.data.max_length
        settings.max_prompt_length = recipe.data.max_prompt_length
        settings.beta = recipe.dpo.beta
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def _batches(examples: list[dict], size: int, pad_token_id: int):
    for start in range(0, len(examples), size):
        yield pad_pairs(examples[start:start + size], pad_token_id)


@torch.no_grad()
def pair_scores(loaded: LoadedModel, examples: list[dict], settings: EvalSettings):
    """(chosen, rejected) scores per pair: rewards, or implicit rewards for a policy."""
    chosen, rejected = [], []
    for batch in _batches(examples, settings.batch_size, loaded.tokenizer.pad_token_id):
        scores = loaded.pair_scores(batch, settings.beta)
        half = scores.shape[0] // 2
        chosen += scores[:half].tolist()
        rejected += scores[half:].tolist()
    return chosen, rejected


def preference_report(chosen: list[float], rejected: list[float]) -> dict:
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(margins)

    def stats(values):
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))

    chosen_mean, chosen_std = stats(chosen)
    rejected_mean, rejected_std = stats(rejected)
    return {
        "num_pairs": n,
        "accuracy": sum(m > 0 for m in margins) / n,  # ties count as wrong
        "mean_margin": sum(margins) / n,
        "chosen_mean": chosen_mean, "chosen_std": chosen_std,
        "rejected_mean": rejected_mean, "rejected_std": rejected_std,
    }


def run_eval(model: str, data: str, *, out: Path | None, reward_model: str | None,
             reward_fn: str | None, generate: bool, reference: str | None,
             overrides: dict) -> dict:
    if generate and not (reward_model or reward_fn):
        raise UserError("--generate needs a judge: --reward-model DIR or --reward-fn module:function")
    if reward_model and reward_fn:
        raise UserError("give one judge, --reward-model or --reward-fn, not both")
    if (reward_model or reward_fn) and not generate:
        raise UserError("--reward-model/--reward-fn judge generations: add --generate")
    settings = settings_for(model, overrides)
    loaded = load_for_eval(model, reference=reference)
    judge = None
    if generate:
        from .generate import make_scorer

        if loaded.kind != "policy":
            raise UserError("--generate needs a policy (--model), not a reward model")
        judge = make_scorer(loaded, reward_model, reward_fn)
    rows = load_source(data, "preference", key="--data")
    examples, drop = build_preference_dataset(rows, loaded.tokenizer, settings.template,
                                              settings.max_length, settings.max_prompt_length,
                                              source=data)
    console.print(f"{data}: {drop.summary()}", highlight=False)
    chosen, rejected = pair_scores(loaded, examples, settings)
    report = {"model": model, "kind": loaded.kind, "data": data,
              **preference_report(chosen, rejected), "skipped": drop.total - drop.kept}
    if loaded.kind == "policy":
        report["beta"] = settings.beta
    if judge is not None:
        from .generate import generation_report

        report["generation"] = generation_report(loaded, examples, settings, judge)
    out = Path(out) if out else _default_out(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=1))
    plots = write_plots(out, chosen, rejected, loaded.kind)
    write_markdown(out.with_suffix(".md"), report, plots)
    _print_summary(report, out)
    return report


def _default_out(model: str) -> Path:
    path = Path(model)
    base = path if (path / FINAL).is_dir() or (path / RECIPE).is_file() else Path(".")
    return base / "eval" / "report.json"


def _print_summary(report: dict, out: Path) -> None:
    what = "reward" if report["kind"] == "reward_model" else "implicit reward"
    console.print(f"{report['num_pairs']} pairs: {what} accuracy {report['accuracy']:.3f}, "
                  f"mean margin {report['mean_margin']:.3f}", highlight=False)
    gen = report.get("generation")
    if gen:
        console.print(f"generation: mean reward {gen['mean_reward']:.3f} (reference "
                      f"{gen['reference_mean_reward']:.3f}), win rate {gen['win_rate']:.3f}, "
                      f"KL {gen['kl']:.3f}", highlight=False)
    console.print(f"report: {out} (+ .md, plots)", highlight=False)

