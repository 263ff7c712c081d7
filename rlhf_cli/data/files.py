"""Reading training rows from local files (jsonl, jsonl.gz, json, parquet, csv) or the hub.

Every row is a plain `dict`. `load_rows` returns a `Rows` list that also remembers where each
row came from (`file.jsonl:12`), so that later validation errors can point at the line.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from rlhf_cli.errors import UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class Rows(list):
    """A list of row dicts plus `locations[i]`, a human-readable origin of row i."""

    def __init__(self, rows: list[dict], locations: list[str]):
        super().__init__(rows)
        self.locations = locations


def load_rows(path: str, split: str = "train") -> Rows:
    """All rows of a local data file, or of a hub dataset when `path` looks like `org/name`."""
    local = Path(path)
    if local.is_dir():
        raise UserError(f"{path} is a directory; expected one of {', '.join(SUFFIXES)} files")
    if not local.exists():
        if _HUB_NAME.match(path) and not path.endswith(SUFFIXES):
            return _check_nonempty(_load_hub(path, split), path)
        raise UserError(f"data file not found: {path}")
    name = local.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        pairs = list(iter_rows(path))
        rows = Rows([row for _, row in pairs], [where for where, _ in pairs])
    elif name.endswith(".json"):
        rows = _load_json(path)
    elif name.endswith(".parquet"):
        rows = _load_parquet(path)
    elif name.endswith(".csv"):
        rows = _load_csv(path)
    else:
        raise UserError(f"unsupported data file type: {path} (expected {', '.join(SUFFIXES)})")
    return _check_nonempty(rows, path)


def iter_rows(path: str) -> Iterator[tuple[str, dict]]:
    """Stream `(where, row)` from a .jsonl or .jsonl.gz file; blank lines are skipped."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            yield from _parse_jsonl(handle, path)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        # gzip raises BadGzipFile (an OSError) lazily, on the first read
        raise UserError(f"cannot read {path}: {exc}") from exc


def _parse_jsonl(lines, path: str) -> Iterator[tuple[str, dict]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            # Without its newline: a line cut short would otherwise be reported by json as
            # "line 2 column 1", which contradicts the file line number in `where`.
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed JSON: {exc.msg} at column {exc.colno}", where=where) from exc
        if not isinstance(row, dict):
            raise UserError(f"expected a JSON object, got {type(row).__name__}", where=where)
        yield where, row


def _load_json(path: str) -> Rows:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # A .json file that is really JSON Lines: common enough to accept
            pairs = list(_parse_jsonl(text.splitlines(), path))
            return Rows([row for _, row in pairs], [where for where, _ in pairs])
        raise UserError(f"malformed JSON: {exc}", where=f"{path}:{exc.lineno}") from exc
    if isinstance(data, dict):
        key = next((k for k in ("data", "train") if isinstance(data.get(k), list)), None)
        if key is None:
            raise UserError(f"{path}: expected a list of objects, or an object with a 'data' or "
                            "'train' list")
        data = data[key]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"expected a JSON object, got {type(row).__name__}",
                            where=f"{path} row {i + 1}")
    return Rows(data, [f"{path} row {i + 1}" for i in range(len(data))])


def _load_parquet(path: str) -> Rows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise UserError(f"cannot read parquet file {path}: {exc}") from exc
    return Rows(rows, [f"{path} row {i + 1}" for i in range(len(rows))])


def _load_csv(path: str) -> Rows:
    import pandas as pd

    try:
        # Everything as text, and empty cells as "" rather than NaN: an empty Alpaca `input`
        # must stay an empty string, and "1.0" must not become a float.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas parser errors have no common base class
        raise UserError(f"cannot read csv file {path}: {exc}") from exc
    rows = frame.to_dict(orient="records")
    # header is line 1; this is exact unless a cell contains a newline
    return Rows(rows, [f"{path}:{i + 2}" for i in range(len(rows))])


def _load_hub(name: str, split: str) -> Rows:
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        raise UserError(f"data file not found: {name} (HF_HUB_OFFLINE is set, so it was not "
                        "looked up as a hub dataset)")
    try:
        import datasets

        rows = datasets.load_dataset(name, split=split).to_list()
    except Exception as exc:  # network, auth, missing split, ...: all are input problems here
        raise UserError(f"cannot load hub dataset {name} (split {split!r}): {exc}") from exc
    return Rows(rows, [f"{name} row {i + 1}" for i in range(len(rows))])


def _check_nonempty(rows: Rows, path: str) -> Rows:
    if not rows:
        raise UserError("no rows", where=path)
    return rows
