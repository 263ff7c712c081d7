"""A recipe file read safely, with the line of every dotted key, for error messages. No torch."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError


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
