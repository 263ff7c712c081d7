"""The embedded default: a byte-level tokenizer, tiny LLaMA models and a checkable task.

Everything here is built in code and deterministic, so `builtin:tiny` with `builtin:sort`
runs every stage offline.

Names are imported lazily: `rlhf_cli.builtin.tasks` (data and rewards) needs neither torch
nor transformers, and importing it should not pay for them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "model": (
        "SIZES",
        "build_config",
        "build_model",
        "count_params",
        "default_root",
        "materialize",
        "resolve_builtin",
    ),
    "tasks": (
        "TASKS",
        "Task",
        "builtin_reward_fn",
        "builtin_rows",
        "parse_data_spec",
        "sort_exact",
        "sort_reward",
        "sort_rows",
    ),
    "tokenizer": ("build_tokenizer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULE_OF[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
