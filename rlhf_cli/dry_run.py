"""`--dry-run` and `rlhf preview`: what would run, and what the model will see."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.syntax import Syntax

from . import config, launcher
from .engine.run_dir import RECIPE
from .schema import Recipe

out = Console()


def show_dry_run(recipe: Recipe, resume: bool = False) -> None:
    from pathlib import Path

    if recipe.launch.deepspeed:  # a typo here would otherwise show only once workers start
        from .preflight import read_deepspeed_json

        read_deepspeed_json(recipe.launch.deepspeed)
    out.rule("resolved recipe")
    out.print(Syntax(config.dump_recipe(recipe), "yaml", background_color="default"))
    argv = launcher.worker_argv(recipe.launch, str(Path(recipe.output_dir) / RECIPE), resume=resume)
    out.rule("launch command")
    out.print(launcher.format_argv(argv), highlight=False, soft_wrap=True)
    if recipe.stage == "ppo":
        from .stages.ppo.plan import ppo_plan

        out.rule("ppo")
        for line in ppo_plan(recipe):
            out.print(line, highlight=False, soft_wrap=True)
    out.rule("first training example")
    show_preview(recipe, n=1, as_json=False)


def _rows(recipe: Recipe, kind: str, n: int) -> list:
    """Enough leading rows for n examples after skips (a few rows may be dropped)."""
    from .data.sources import load_source

    return load_source(recipe.data.train, kind)[: max(n * 4, n)]


def _sft_examples(recipe: Recipe, tokenizer, n: int) -> list[dict]:
    from .data.loaders import sft_examples  # as training will see them

    return sft_examples(_rows(recipe, "sft", n), recipe, tokenizer, recipe.data.train)[0][:n]


def _preference_examples(recipe: Recipe, tokenizer, n: int) -> list[dict]:
    from .data.loaders import pair_examples

    return pair_examples(_rows(recipe, "preference", n), recipe, tokenizer, recipe.data.train)[0][:n]


def _unpaired_examples(recipe: Recipe, tokenizer, n: int) -> list[dict] | None:
    """KTO's unpaired rows (`prompt`/`completion`/`label`), or None for paired data."""
    from .data.loaders import unpaired_examples
    from .data.unpaired import is_unpaired

    rows = _rows(recipe, "preference", n)
    if recipe.stage != "dpo" or recipe.dpo.loss_type != "kto" or not is_unpaired(rows):
        return None
    return unpaired_examples(rows, recipe, tokenizer, recipe.data.train)[0][:n]


def _prompt_examples(recipe: Recipe, tokenizer, n: int) -> list[dict]:
    from .data.prompt_data import build_prompt_dataset

    examples, _ = build_prompt_dataset(_rows(recipe, "prompts", n), tokenizer, recipe.data.template,
                                       recipe.data.max_prompt_length, source=recipe.data.train)
    return examples[:n]


def _show_ranked(recipe: Recipe, tokenizer, n: int, as_json: bool) -> None:
    """RRHF's first n prompts, each with its K responses and their scores."""
    from .data import preview
    from .data.loaders import ranked_examples
    from .data.ranked import response_rows

    examples = ranked_examples(_rows(recipe, "preference", n), recipe, tokenizer, recipe.data.train)[0][:n]
    if as_json:
        return _emit_json([{"prompt": e["prompt"], "responses": e["responses"], "scores": e["scores"],
                            "responses_input_ids": [list(r["input_ids"]) for r in response_rows(e)],
                            "responses_labels": [list(r["labels"]) for r in response_rows(e)]}
                           for e in examples])
    rows = [row for e in examples for row in response_rows(e)]
    return out.print(preview.render_preview_rich(rows, tokenizer, len(rows)))


def _emit_json(items: list[dict]) -> None:
    for item in items:
        sys.stdout.write(json.dumps(item) + "\n")


def show_preview(recipe: Recipe, n: int, as_json: bool) -> None:
    """The first n training examples of the recipe's stage, as rich panels or JSON lines.

    JSON (DESIGN.md): sft `input_ids`/`labels`; rm and dpo `prompt`, `chosen`, `rejected`
    and `{chosen,rejected}_{input_ids,labels}`; ppo `prompt` and `prompt_input_ids`; KTO's
    unpaired rows as sft's plus `label`; rrhf `prompt`, `responses`, `scores` and
    `responses_{input_ids,labels}` (one list per response).
    """
    from .data import preview
    from .models.policy import tokenizer_for

    tokenizer = tokenizer_for(recipe)
    if recipe.stage == "sft":
        examples = _sft_examples(recipe, tokenizer, n)
        if as_json:
            return _emit_json(preview.preview_sft(examples, tokenizer, n))
        return out.print(preview.render_preview_rich(examples, tokenizer, n))
    if recipe.stage == "rrhf":
        return _show_ranked(recipe, tokenizer, n, as_json)
    pairs = recipe.stage == "rm" or (recipe.stage == "dpo" and not recipe.dpo.online)  # online: prompts
    unpaired = _unpaired_examples(recipe, tokenizer, n) if pairs and recipe.stage == "dpo" else None
    if unpaired is not None:  # KTO rows: one completion each, shown like SFT examples
        if as_json:
            items = preview.preview_sft(unpaired, tokenizer, n)
            labelled = zip(items, unpaired, strict=True)
            return _emit_json([{**item, "label": example["label"]} for item, example in labelled])
        return out.print(preview.render_preview_rich(unpaired, tokenizer, n))
    if pairs:
        examples = _preference_examples(recipe, tokenizer, n)
        if as_json:
            return _emit_json(preview.preview_preference(examples, tokenizer, n))
        return out.print(preview.render_preference_rich(examples, tokenizer, n))
    examples = _prompt_examples(recipe, tokenizer, n)  # ppo, online dpo
    if as_json:
        return _emit_json(preview.preview_prompts(examples, n))
    return out.print(preview.render_prompts_rich(examples, tokenizer, n))
