"""The one way a recipe becomes an object: load YAML, apply `--set`, type, validate.

Every error is a `UserError` naming the file, line and dotted key, so that the CLI can
print one `error:` line. No torch here.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .recipe_yaml import read_yaml
from .schema import Recipe
from .schema_fields import field_problem

# ----------------------------------------------------------------------- typing


class _Located:
    """Knows where a dotted key came from, for error messages."""

    def __init__(self, source: str, lines: dict[str, int], overridden: set[str]):
        self.source, self.lines, self.overridden = source, lines, overridden

    def where(self, key: str) -> str:
        if key in self.overridden:
            return f"--set {key}"
        parts = key.split(".")
        for depth in range(len(parts), 0, -1):
            line = self.lines.get(".".join(parts[:depth]))
            if line:
                return f"{self.source}:{line}: {key}"
        return f"{self.source}: {key}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce_scalar(value: Any, tp: type, key: str, loc: _Located) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(
        f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", where=loc.where(key)
    )


def _coerce(value: Any, tp: Any, key: str, loc: _Located) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise UserError("may not be null", where=loc.where(key))
        # Try the option whose shape matches first (a list value -> list[...]), so that
        # `str | list[str]` keeps a string a string.
        candidates = sorted((o for o in options if o is not type(None)),
                            key=lambda o: (typing.get_origin(o) is list) != isinstance(value, list))
        for option in candidates:
            try:
                return _coerce(value, option, key, loc)
            except UserError:
                pass
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise UserError(f"expected {names}, got {value!r}", where=loc.where(key))
    if value is None:
        raise UserError("may not be null", where=loc.where(key))
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"expected a list, got {value!r}", where=loc.where(key))
        return [_coerce(v, item_type, f"{key}[{i}]", loc) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, key, loc)
    return _coerce_scalar(value, tp, key, loc)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(options)}"


def _build_section(cls: type, raw: Any, prefix: str, loc: _Located) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping, got {raw!r}", where=loc.where(prefix or "(top)"))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise UserError(f"unknown key `{key}`{_suggest(str(name), names)}", where=loc.where(key))
        values[name] = _coerce(value, hints[name], key, loc)
    # A section given as a mapping keeps defaults for the keys it leaves out.
    return cls(**values)


# ------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4); the value is read as YAML (null clears)."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: `{part}` is not a section")
        node = child
    node[parts[-1]] = value


def build_section(cls: type, overrides: list[str], prefix: str) -> Any:
    """One recipe section from `--set PREFIX.KEY=VALUE` overrides alone, typed and checked as in a
    recipe (for a command without a recipe: `rlhf generate`'s launch keys); another key is an error.
    The section's `problems` must not read the recipe (it gets None)."""
    data, overridden = {}, set()
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != prefix or not name:
            raise UserError(f"only `{prefix}.KEY=VALUE` can be set here", where=f"--set {key}")
        apply_override(data, name, value)
        overridden.add(key)
    loc = _Located("--set", {}, overridden)
    built = _build_section(cls, data, prefix, loc)
    for key, message in itertools.chain(_field_problems(built, prefix + "."), built.problems(None)):
        raise UserError(message, where=loc.where(key))
    return built


# ------------------------------------------------------------------ validation


def _field_problems(section: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """Each key against its own field's description (allowed names, bound), in field order."""
    for spec in dataclasses.fields(section):
        key, value = f"{prefix}{spec.name}", getattr(section, spec.name)
        if dataclasses.is_dataclass(value):
            yield from _field_problems(value, key + ".")
        elif (problem := field_problem(spec, value)) is not None:
            yield key, problem


def _validate(recipe: Recipe, loc: _Located) -> None:
    """Every key, then each section's checks across keys; the first problem is the error."""
    sections = (getattr(recipe, spec.name) for spec in dataclasses.fields(recipe))
    cross = (p for section in sections if hasattr(section, "problems") for p in section.problems(recipe))
    for key, message in itertools.chain(_field_problems(recipe, ""), cross):
        raise UserError(message, where=loc.where(key))


def micro_batching(recipe: Recipe) -> tuple[int, int]:
    """(rows per forward/backward, forward/backwards per optimizer step) for this stage."""
    if recipe.stage == "ppo":
        ppo = recipe.ppo
        micro = ppo.micro_batch_size or ppo.mini_batch_size
        return micro, max(1, ppo.mini_batch_size // micro)
    return recipe.train.batch_size, recipe.train.grad_accum


# ------------------------------------------------------------------------ API


def build_recipe(data: dict, *, source: str = "recipe", lines: dict | None = None,
                 overridden: set[str] | None = None) -> Recipe:
    loc = _Located(source, lines or {}, overridden or set())
    recipe = _build_section(Recipe, data, "", loc)
    _validate(recipe, loc)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = (), *, stage: str | None = None,
                output_dir: str | None = None) -> Recipe:
    """Read, override, type and validate a recipe.

    `stage` is the command that was run: a recipe written for another stage is an error
    rather than a silently different training run.
    """
    path = Path(path)
    data, lines = read_yaml(path)
    overridden = set()
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
        overridden.add(key)
    if stage is not None:
        declared = data.get("stage", stage)
        if declared != stage:
            raise UserError(
                f"this recipe is for stage `{declared}`, not `{stage}`: run `rlhf {declared}`",
                where=f"{path}:{lines.get('stage', 1)}: stage",
            )
        data["stage"] = stage
    if output_dir is not None:
        data["output_dir"] = output_dir
        overridden.add("output_dir")
    recipe = build_recipe(data, source=str(path), lines=lines, overridden=overridden)
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / path.stem)
    _absolute_paths(recipe)
    return recipe


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _absolute_paths(section: Any) -> None:
    """Keys that name local files (or `file.py:function`) stored absolute, as their fields say."""
    for spec in dataclasses.fields(section):
        value, names = getattr(section, spec.name), spec.metadata.get("names")
        if dataclasses.is_dataclass(value):
            _absolute_paths(value)
        elif not value or not names or value.startswith("builtin:"):
            continue
        elif names == "path":
            setattr(section, spec.name, _absolute(value))
        else:
            module, sep, function = value.rpartition(":")
            if module.endswith(".py"):
                setattr(section, spec.name, f"{_absolute(module)}{sep}{function}")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def changed_keys(old: Recipe, new: Recipe) -> list[str]:
    """`key (old -> new)` for every dotted key that differs; output_dir aside (runs move)."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(value, dict):
            return {prefix: value}
        return {k: v for name, child in value.items()
                for k, v in flat(child, f"{prefix}.{name}" if prefix else name).items()}

    before, after = flat(recipe_to_dict(old)), flat(recipe_to_dict(new))
    return [f"{key} ({before.get(key)!r} -> {after.get(key)!r})"
            for key in sorted(before.keys() | after.keys())
            if key != "output_dir" and before.get(key) != after.get(key)]


def load_resolved(path: str | Path) -> Recipe:
    """Load a recipe.yaml written by `dump_recipe` (a run directory's own copy)."""
    data, lines = read_yaml(Path(path))
    return build_recipe(data, source=str(path), lines=lines)
