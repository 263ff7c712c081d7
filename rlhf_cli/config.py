"""The one way a recipe becomes an object: load YAML, apply `--set`, type, validate.

Every error is a `UserError` naming the file, line and dotted key, so that the CLI can
print one `error:` line. No torch here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .schema import BOUNDS, CHOICES, Recipe

# ----------------------------------------------------------------------------- YAML


def _line_map(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line number, read from the YAML node tree."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, key + "."))
    return lines


def read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """Safely parse a recipe file; returns the mapping and where each key is."""
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context_mark", None)
        if mark is not None and context is not None and mark.index >= len(text.rstrip()):
            # An unclosed bracket or quote is only noticed at the end of the file, past the
            # last line; the line that opened it is the one to fix.
            mark, problem = context, f"{problem} ({exc.context})"
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"invalid YAML: {problem}", where=where) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of sections", where=str(path))
    return data, (_line_map(node) if node is not None else {})


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


# ------------------------------------------------------------------ validation


def _get(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def _validate(recipe: Recipe, loc: _Located) -> None:
    for key, choices in CHOICES.items():
        value = _get(recipe, key)
        if value is not None and value not in choices:
            raise UserError(
                f"`{value}` is not one of {', '.join(choices)}", where=loc.where(key)
            )
    for key, low, inclusive in BOUNDS:
        value = _get(recipe, key)
        if value is None:
            continue
        if value < low or (value == low and not inclusive):
            relation = ">=" if inclusive else ">"
            raise UserError(f"must be {relation} {low}, got {value}", where=loc.where(key))
    _cross_checks(recipe, loc)


def _cross_checks(recipe: Recipe, loc: _Located) -> None:
    data, train, launch = recipe.data, recipe.train, recipe.launch
    if not data.train:
        raise UserError("missing training data: set `data.train`", where=loc.where("data.train"))
    if data.max_prompt_length is not None and data.max_prompt_length >= data.max_length:
        raise UserError(
            f"must be smaller than data.max_length ({data.max_length})",
            where=loc.where("data.max_prompt_length"),
        )
    if train.eval_every is not None and not data.eval:
        raise UserError("needs evaluation data: set `data.eval`", where=loc.where("train.eval_every"))
    if train.warmup_ratio >= 1:
        raise UserError("must be below 1", where=loc.where("train.warmup_ratio"))
    if launch.num_machines > 1 and not launch.main_process_ip:
        raise UserError(
            "several machines need `launch.main_process_ip`", where=loc.where("launch.num_machines")
        )
    if launch.machine_rank >= launch.num_machines:
        raise UserError("must be below launch.num_machines", where=loc.where("launch.machine_rank"))
    if launch.deepspeed and not Path(launch.deepspeed).is_file():
        raise UserError(
            f"DeepSpeed config not found: {launch.deepspeed}", where=loc.where("launch.deepspeed")
        )
    if recipe.stage == "ppo" and not (recipe.ppo.reward_model or recipe.ppo.reward_fn):
        raise UserError(
            "PPO needs a reward: set `ppo.reward_model` or `ppo.reward_fn`", where=loc.where("ppo")
        )
    if train.eval_reward_fn and not data.eval:
        raise UserError(
            "needs evaluation prompts: set `data.eval`", where=loc.where("train.eval_reward_fn")
        )
    if recipe.model.quantization and recipe.model.lora is None:
        raise UserError("a quantized base cannot be fine-tuned in full (its weights are frozen "
                        "integers): set model.lora, or model.quantization: null",
                        where=loc.where("model.quantization"))
    if recipe.stage == "ppo":
        _ppo_checks(recipe, loc)


def _ppo_checks(recipe: Recipe, loc: _Located) -> None:
    ppo = recipe.ppo
    if ppo.advantage in ("grpo", "rloo") and ppo.samples_per_prompt < 2:
        raise UserError(f"{ppo.advantage} compares several samples of each prompt: set it to 2 or more",
                        where=loc.where("ppo.samples_per_prompt"))
    critic_free = ppo.advantage != "gae"
    if critic_free and ppo.arrangement == "1base-2lora":
        raise UserError(f"ppo.advantage {ppo.advantage} trains no critic, and 1base-2lora's second "
                        "adapter is the critic: use 1base-1lora", where=loc.where("ppo.arrangement"))
    if critic_free and ppo.arrangement == "2base-2lora" and not ppo.reward_model:
        raise UserError(f"ppo.advantage {ppo.advantage} trains no critic, and with a reward function "
                        "2base-2lora's second base would hold nothing: use 1base-1lora",
                        where=loc.where("ppo.arrangement"))
    if critic_free and ppo.critic_warmup_steps:
        raise UserError(f"ppo.advantage {ppo.advantage} trains no critic to warm up: set it to 0",
                        where=loc.where("ppo.critic_warmup_steps"))
    _micro_batch_checks(ppo, loc)
    if ppo.ptx_coef > 0 and not ppo.ptx_data:
        raise UserError("needs SFT data for the ptx loss: set `ppo.ptx_data`",
                        where=loc.where("ppo.ptx_coef"))
    if ppo.ema_decay is not None and ppo.ema_decay >= 1:
        raise UserError(f"must be below 1, got {ppo.ema_decay}", where=loc.where("ppo.ema_decay"))


def _micro_batch_checks(ppo, loc: _Located) -> None:
    """Every optimizer step must accumulate the same number of micro-batches (DeepSpeed counts
    them to find the step): the minibatch divides into micro-batches and the rollout into
    minibatches."""
    micro = ppo.micro_batch_size
    if micro is None or micro == ppo.mini_batch_size:
        return
    where = loc.where("ppo.micro_batch_size")
    if micro > ppo.mini_batch_size or ppo.mini_batch_size % micro:
        raise UserError(f"{micro} must divide ppo.mini_batch_size ({ppo.mini_batch_size})", where=where)
    responses = ppo.rollout_batch_size * ppo.samples_per_prompt
    if responses % ppo.mini_batch_size:
        raise UserError(f"with micro-batches, ppo.mini_batch_size ({ppo.mini_batch_size}) must divide the "
                        f"responses of a rollout ({responses} per process)", where=where)


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


# Keys that may name local files; stored absolute so that a run's recipe.yaml works from
# any directory (resume, merge, re-run).
_PATH_KEYS = ("model.base", "model.tokenizer", "data.train", "data.eval", "launch.deepspeed",
              "ppo.reward_model", "ppo.ptx_data")
_FUNCTION_KEYS = ("train.eval_reward_fn", "ppo.reward_fn")


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _absolute_paths(recipe: Recipe) -> None:
    for key in _PATH_KEYS + _FUNCTION_KEYS:
        section_name, name = key.split(".")
        section = getattr(recipe, section_name)
        value = getattr(section, name)
        if not value or value.startswith("builtin:"):
            continue
        if key in _FUNCTION_KEYS:
            module, sep, function = value.rpartition(":")
            if module.endswith(".py"):
                setattr(section, name, f"{_absolute(module)}{sep}{function}")
        else:
            setattr(section, name, _absolute(value))


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
