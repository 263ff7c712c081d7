"""Reading training rows from local files (jsonl, jsonl.gz, json, parquet, csv) or the hub.

Every row is a plain `dict`. `load_rows` returns a sequence of rows that also remembers where
each row came from (`file.jsonl:12`), so that later validation errors can point at the line.
JSON Lines files (the format for big data sets) are not held in memory: `JsonlRows` keeps
each row's byte offset and parses the line when the row is read.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

from rlhf_cli.errors import UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class Rows(list):
    """A list of row dicts plus `locations[i]`, a human-readable origin of row i."""

    def __init__(self, rows: list[dict], locations: list[str]):
        super().__init__(rows)
        self.locations = locations


class JsonlRows(Sequence):
    """The rows of a .jsonl (or .jsonl.gz) file, parsed on demand.

    Holds 16 bytes a row (offset and line number) instead of the parsed dicts, which take
    several times the file's size: a data set larger than memory can be indexed. Every
    line is parsed once while indexing, so a malformed line is reported before training.
    A .jsonl.gz file is decompressed into an anonymous temporary file (gzip cannot seek).
    """

    def __init__(self, path: str):
        self.path = path
        self._offsets, self._lines = array("q"), array("q")
        try:
            self._handle = self._open_indexable()
            self._index()
        except (OSError, EOFError) as exc:
            # gzip raises BadGzipFile (an OSError) lazily, on the first read
            raise UserError(f"cannot read {path}: {exc}") from exc
        self.locations = _Locations(path, self._lines)

    def _open_indexable(self):
        if not self.path.lower().endswith(".gz"):
            return open(self.path, "rb")  # held open for the rows' lifetime
        plain = tempfile.TemporaryFile()  # deleted when closed
        try:
            with gzip.open(self.path, "rb") as source:
                shutil.copyfileobj(source, plain)
        except BaseException:
            plain.close()
            raise
        plain.seek(0)
        return plain

    def _index(self) -> None:
        offset = 0
        for lineno, line in enumerate(self._handle, start=1):
            if line.strip():
                _parse_line(line, self.path, lineno)
                self._offsets.append(offset)
                self._lines.append(lineno)
            offset += len(line)
        self._size = offset

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            picked = range(len(self))[index]
            return Rows([self[i] for i in picked], [self.locations[i] for i in picked])
        index = range(len(self))[index]  # negative indices; IndexError when out of range
        start = self._offsets[index]
        end = self._offsets[index + 1] if index + 1 < len(self) else self._size
        # Up to the next row: blank lines in between are whitespace, which JSON allows.
        return _parse_line(self._read(start, end - start), self.path, self._lines[index])

    def _read(self, start: int, size: int) -> bytes:
        if hasattr(os, "pread"):  # no shared file position, no read-ahead thrown away
            return os.pread(self._handle.fileno(), size, start)
        self._handle.seek(start)
        return self._handle.read(size)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"JsonlRows({self.path!r}, {len(self)} rows)"

    def close(self) -> None:
        self._handle.close()


class _Locations(Sequence):
    """`locations[i]` of JsonlRows, computed rather than stored (`file.jsonl:LINE`)."""

    def __init__(self, path: str, lines: array):
        self.path, self.lines = path, lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [f"{self.path}:{line}" for line in self.lines[index]]
        return f"{self.path}:{self.lines[index]}"


def _parse_line(line: bytes | str, path: str, lineno: int) -> dict:
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        # Without its newline: a line cut short would otherwise be reported by json as
        # "line 2 column 1", which contradicts the file line number in `where`.
        row = json.loads(text.rstrip("\r\n"))
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text: {exc}", where=f"{path}:{lineno}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed JSON: {exc.msg} at column {exc.colno}",
                        where=f"{path}:{lineno}") from exc
    if not isinstance(row, dict):
        raise UserError(f"expected a JSON object, got {type(row).__name__}", where=f"{path}:{lineno}")
    return row


def load_rows(path: str, split: str = "train") -> Rows | JsonlRows:
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
        rows = JsonlRows(path)
    elif name.endswith(".json"):
        rows = _load_json(path)
    elif name.endswith(".parquet"):
        rows = _load_parquet(path)
    elif name.endswith(".csv"):
        rows = _load_csv(path)
    else:
        raise UserError(f"unsupported data file type: {path} (expected {', '.join(SUFFIXES)})")
    return _check_nonempty(rows, path)


def _parse_jsonl(lines, path: str) -> Iterator[tuple[str, dict]]:
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            yield f"{path}:{lineno}", _parse_line(line, path, lineno)


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


def _check_nonempty(rows, path: str):
    if not rows:
        raise UserError("no rows", where=path)
    return rows
