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

    out.rule("resolved recipe")
    out.print(Syntax(config.dump_recipe(recipe), "yaml", background_color="default"))
    argv = launcher.worker_argv(recipe.launch, str(Path(recipe.output_dir) / RECIPE), resume=resume)
    out.rule("launch command")
    out.print(launcher.format_argv(argv), highlight=False, soft_wrap=True)
    out.rule("first training example")
    show_preview(recipe, n=1, as_json=False)


def _sft_examples(recipe: Recipe, n: int):
    from .data.sft import build_sft_dataset, loss_on_every_token
    from .data.sources import load_source
    from .stages.common import tokenizer_for

    tokenizer = tokenizer_for(recipe)
    rows = load_source(recipe.data.train, "sft")
    examples, report = build_sft_dataset(rows[: max(n * 4, n)], tokenizer, recipe.data.template,
                                         recipe.data.max_length, recipe.data.max_prompt_length,
                                         source=recipe.data.train)
    if not recipe.sft.completion_only:  # as training will see them (stages/sft.py)
        examples = loss_on_every_token(examples)
    return tokenizer, examples[:n]


def show_preview(recipe: Recipe, n: int, as_json: bool) -> None:
    from .data.preview import preview_sft, render_preview_rich
    from .errors import UserError

    if recipe.stage != "sft":
        raise UserError(f"preview of `{recipe.stage}` data is not implemented yet")
    tokenizer, examples = _sft_examples(recipe, n)
    if as_json:
        for item in preview_sft(examples, tokenizer, n):
            sys.stdout.write(json.dumps(item) + "\n")
        return
    out.print(render_preview_rich(examples, tokenizer, n))
