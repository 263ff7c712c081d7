"""Models that bring their own modelling code (Baichuan, Baichuan 2, ...).

Their config.json has an `auto_map` naming Python files in the model directory, and
transformers runs those files only with `trust_remote_code=True`. Without it, transformers
asks on the terminal (and waits 15 s) or fails deep inside a worker; we say which recipe
key to set before anything starts. Reading JSON only: no torch import here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

KEY = "model.trust_remote_code"


def _config_file(source: str) -> Path | None:
    """config.json of a local directory, or of a hub model already in the cache (no network)."""
    path = Path(source).expanduser() / "config.json"
    if path.is_file():
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a valid repository name
        return None
    return Path(cached) if isinstance(cached, str) else None


def _local_config(source: str) -> dict | None:
    path = _config_file(source)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # transformers reports an unreadable config with its own message
    return config if isinstance(config, dict) else None


def _built_into_transformers(model_type) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def needs_remote_code(source: str) -> bool:
    """True when the model `source` (a directory, or a cached hub name) loads only by running
    its own code: its config names classes in `auto_map` and its `model_type` is not one
    transformers knows (with a known type, transformers uses its own classes)."""
    config = _local_config(source)
    if not config or not config.get("auto_map"):
        return False
    return not _built_into_transformers(config.get("model_type"))


def check_trust(source: str, trust_remote_code: bool, what: str = "model.base") -> None:
    """A UserError naming `model.trust_remote_code` when `source` needs remote code and the
    recipe does not allow it."""
    if trust_remote_code or not needs_remote_code(source):
        return
    raise UserError(f"{what} {source} ships its own modelling code (auto_map in its config.json); "
                    "set model.trust_remote_code: true to run it (read that code first: it runs "
                    "with your permissions)", where=KEY)


def code_files(source: str) -> list[Path]:
    """The Python files of a local model directory whose config has an `auto_map` (its
    modelling, configuration and tokenizer code), which a merged model must carry to load
    again; none for a model without code of its own."""
    path = Path(source).expanduser()
    config = _local_config(source) if path.is_dir() else None
    return sorted(path.glob("*.py")) if config and config.get("auto_map") else []


def refusal(exc: Exception, source: str) -> UserError | None:
    """transformers' own "contains custom code ... trust_remote_code=True" error as a UserError
    naming the recipe key (for a source the check above could not read, e.g. not yet cached)."""
    if "trust_remote_code" not in str(exc):
        return None
    return UserError(f"{source} ships its own modelling code; set model.trust_remote_code: true to run "
                     "it (read that code first: it runs with your permissions)", where=KEY)
