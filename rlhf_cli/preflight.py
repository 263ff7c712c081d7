"""Cheap checks before any process starts: paths that must exist, modules that must import.

They catch most input errors in the parent process, where one clear `error:` line is
easy, instead of inside N launched workers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .errors import UserError
from .models.remote_code import check_trust
from .schema import Recipe
from .stages import STAGE_RUNNERS


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


def _read_json(path: Path, key: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}", where=key) from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object", where=key)
    return value


def read_deepspeed_json(path: Path | str, key: str = "launch.deepspeed") -> dict:
    """The DeepSpeed config as a dict; a parse error names the file, line and column.

    Called in the launching process (preflight, --dry-run) as well as by each worker, so a
    typo is one `error:` line before torchrun starts N processes that would each hit it.
    """
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}", where=key) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno} column {exc.colno}: {exc.msg}", where=key) from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object", where=key)
    return value


def _check_reward_model(spec: str, key: str = "ppo.reward_model") -> None:
    """An RM run (its final/ holds a SEQ_CLS adapter) or a sequence-classifier model directory
    (`rlhf merge-lora` of an RM run), as PPO's build step reads it."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "not found"
        raise UserError(f"reward model {what}: {spec} (give an `rlhf rm` run or a merged reward "
                        "model directory)", where=key)
    for candidate in (path / "final", path):
        if (candidate / "adapter_config.json").is_file():
            task = _read_json(candidate / "adapter_config.json", key).get("task_type")
            if task != "SEQ_CLS":
                raise UserError(f"{spec} is not a reward model: its adapter is a {task} adapter, not "
                                "a reward model's SEQ_CLS one (train one with `rlhf rm`)", where=key)
            return
        if (candidate / "config.json").is_file():
            architectures = _read_json(candidate / "config.json", key).get("architectures") or []
            if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
                raise UserError(f"{spec} is not a reward model: its architectures are {architectures}, "
                                "not a ...ForSequenceClassification (train one with `rlhf rm`)", where=key)
            return
    raise UserError(f"{spec} holds no reward model: no final/adapter_config.json or config.json "
                    "(an unfinished `rlhf rm` run?)", where=key)


def _check_remote_code(spec: str, trust_remote_code: bool) -> None:
    """A base that ships its own code needs `model.trust_remote_code` (a run directory's
    model is in its final/)."""
    path = Path(spec).expanduser()
    check_trust(str(path / "final" if (path / "final").is_dir() else path), trust_remote_code)


def _check_quantization(recipe: Recipe) -> None:
    """bitsandbytes must be importable, and ZeRO-3 cannot shard its packed weights."""
    if not recipe.model.quantization:
        return
    from .models.quantization import require_bitsandbytes

    require_bitsandbytes()
    if recipe.launch.deepspeed:
        config = _read_json(Path(recipe.launch.deepspeed), "launch.deepspeed")
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        if str(stage) == "3":
            raise UserError("ZeRO-3 partitions every weight across processes, and bitsandbytes' packed "
                            "4-bit/8-bit weights cannot be partitioned: use ZeRO-2 (or no DeepSpeed) "
                            "with a quantized base", where="model.quantization")


def preflight(recipe: Recipe) -> None:
    _check_data(recipe.data.train, "data.train")
    _check_data(recipe.data.eval, "data.eval")
    _check_model(recipe.model.base, "model.base")
    _check_remote_code(recipe.model.base, recipe.model.trust_remote_code)
    if recipe.model.tokenizer:
        _check_model(recipe.model.tokenizer, "model.tokenizer")
    if recipe.launch.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError("launch.deepspeed is set but deepspeed is not installed: "
                        "pip install 'rlhf-cli[deepspeed]'")
    if recipe.launch.deepspeed:
        read_deepspeed_json(recipe.launch.deepspeed)
    for key, spec in (("train.eval_reward_fn", recipe.train.eval_reward_fn),
                      ("ppo.reward_fn", recipe.ppo.reward_fn), ("rft.reward_fn", recipe.rft.reward_fn),
                      ("dpo.reward_fn", recipe.dpo.reward_fn)):
        if spec and spec.partition(":")[0].endswith(".py"):
            if not Path(spec.partition(":")[0]).is_file():
                raise UserError(f"reward function file not found: {spec}", where=key)
    _check_quantization(recipe)
    if recipe.stage == "ppo" and recipe.ppo.reward_model:
        _check_reward_model(recipe.ppo.reward_model)
    if recipe.stage == "rft" and recipe.rft.reward_model:
        _check_reward_model(recipe.rft.reward_model, "rft.reward_model")
    if recipe.stage == "dpo" and recipe.dpo.online and recipe.dpo.reward_model:
        _check_reward_model(recipe.dpo.reward_model, "dpo.reward_model")
    if recipe.stage not in STAGE_RUNNERS:
        raise UserError(f"`rlhf {recipe.stage}` is not implemented yet")
