"""Cheap checks before any process starts: paths that must exist, modules that must import.

They catch most input errors in the parent process, where one clear `error:` line is
easy, instead of inside N launched workers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError
from .schema import Recipe


def _check_data(spec: str | None, key: str) -> None:
    if not spec or spec.startswith("builtin:"):
        return
    path = Path(spec).expanduser()
    if path.exists():
        return
    # `org/name` may be a hub data set; anything else must be a local file.
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or path.suffix:
        raise UserError(f"data file not found: {spec}", where=key)


def _check_model(spec: str, key: str) -> None:
    if spec.startswith("builtin:") or Path(spec).expanduser().exists():
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model not found: {spec}", where=key)


def preflight(recipe: Recipe) -> None:
    _check_data(recipe.data.train, "data.train")
    _check_data(recipe.data.eval, "data.eval")
    _check_model(recipe.model.base, "model.base")
    if recipe.model.tokenizer:
        _check_model(recipe.model.tokenizer, "model.tokenizer")
    if recipe.launch.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError("launch.deepspeed is set but deepspeed is not installed: "
                        "pip install 'rlhf-cli[deepspeed]'")
    for key, spec in (("train.eval_reward_fn", recipe.train.eval_reward_fn),
                      ("ppo.reward_fn", recipe.ppo.reward_fn)):
        if spec and spec.partition(":")[0].endswith(".py"):
            if not Path(spec.partition(":")[0]).is_file():
                raise UserError(f"reward function file not found: {spec}", where=key)
    from .worker import STAGE_RUNNERS

    if recipe.stage not in STAGE_RUNNERS:
        raise UserError(f"`rlhf {recipe.stage}` is not implemented yet")
