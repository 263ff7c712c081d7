"""Reward functions named in a recipe: `module:function` or `path/to/file.py:function`.

Imported only when a recipe names one (never evaluated from text), and called as
`f(prompts, responses)`, which must return one number per response.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str, key: str = "ppo.reward_fn") -> RewardFn:
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UserError(f"expected `module:function` or `file.py:function`, got {spec!r}",
                        where=key)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"reward function file not found: {path}", where=key)
            module_spec = importlib.util.spec_from_file_location(f"_rlhf_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise UserError(f"cannot import {module_name}: {type(exc).__name__}: {exc}", where=key) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"{module_name} has no function `{func_name}`", where=key)
    return _checked(fn, spec)


def _checked(fn, spec: str) -> RewardFn:
    def call(prompts: list[str], responses: list[str]) -> list[float]:
        try:
            scores = fn(list(prompts), list(responses))
        except Exception as exc:
            raise UserError(f"reward function {spec} raised {type(exc).__name__}: {exc}") from None
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise UserError(f"reward function {spec} must return numbers, got {scores!r:.80}") from None
        if len(scores) != len(responses):
            raise UserError(
                f"reward function {spec} returned {len(scores)} scores for {len(responses)} responses"
            )
        if not all(math.isfinite(s) for s in scores):
            raise UserError(f"reward function {spec} returned a NaN or infinite score")
        return scores

    return call
