"""What every benchmark reports: the machine, the versions, a JSON file and rich tables.

Nothing here imports torch (see _common.py).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------- reporting


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("rlhf-cli", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def loadavg() -> float:
    return os.getloadavg()[0]


def header(benchmark: str) -> dict:
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
            "versions": versions()}


def write_json(result: dict, path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def print_rows(title: str, columns: list[str], rows: list[tuple]) -> None:
    """A rich table: `rows` are (label, value, value, ...) with values already formatted."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column(columns[0])
    for name in columns[1:]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def cell(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def compare_rows(labels: list[tuple[str, str, str]], sides: list[dict], ratio: dict) -> list[tuple]:
    """(label, key, format) -> table rows with one cell per side and the ratio of the first two."""
    return [(label, *(cell(side.get(key), fmt) for side in sides), cell(ratio.get(key), "{:.2f}"))
            for label, key, fmt in labels]
