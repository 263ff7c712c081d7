"""Where rows come from: the built-in task (`builtin:sort[:split]`) or a file / hub name."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UserError


def load_source(spec: str, kind: str, key: str = "data.train") -> Sequence[dict]:
    """Rows of `spec`; `kind` (sft, preference, prompts) picks the built-in task's view."""
    if spec.startswith("builtin:"):
        from ..builtin.tasks import builtin_rows

        return builtin_rows(spec, kind)
    from .files import load_rows

    try:
        return load_rows(spec)
    except UserError as exc:
        if exc.where:
            raise
        raise UserError(str(exc), where=key) from None
