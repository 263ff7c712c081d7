"""How a recipe key describes itself beside its dataclass field: allowed names, lower bound,
or "names a local file / a `file.py:function`" (stored absolute). `config.py` walks these.

Kept free of torch and of I/O, like the schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import Field, field
from typing import Any

# What a section's cross-key checks yield: (dotted key, message); the first one is reported.
Problems = Iterator[tuple[str, str]]


def choice(default: str, names: Iterable[str]) -> Any:
    """A key whose value must be one of `names`."""
    return field(default=default, metadata={"choices": tuple(names)})


def at_least(default: Any, low: float) -> Any:
    """A number that must be >= `low` (None, where the field allows it, is not checked)."""
    return field(default=default, metadata={"bound": (low, True)})


def above(default: Any, low: float) -> Any:
    """A number that must be > `low`."""
    return field(default=default, metadata={"bound": (low, False)})


def local_path(default: str | None = None) -> Any:
    """A key that may name a local file: stored absolute so that a run's recipe.yaml works from
    any directory (resume, merge, re-run)."""
    return field(default=default, metadata={"names": "path"})


def function_ref(default: str | None = None) -> Any:
    """A `module:function` or `file.py:function`; a file is stored absolute, as for paths."""
    return field(default=default, metadata={"names": "function"})


def field_problem(spec: Field, value: Any) -> str | None:
    """What is wrong with `value` by its field's own description, or None."""
    if value is None:
        return None
    choices = spec.metadata.get("choices")
    if choices is not None and value not in choices:
        return f"`{value}` is not one of {', '.join(choices)}"
    bound = spec.metadata.get("bound")
    if bound is not None:
        low, inclusive = bound
        if value < low or (value == low and not inclusive):
            return f"must be {'>=' if inclusive else '>'} {low}, got {value}"
    return None
