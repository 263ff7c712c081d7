"""Reading training rows from local files (jsonl, jsonl.gz, json, parquet, csv) or the hub.

Every row is a plain `dict`. `load_rows` returns a sequence of rows that also remembers where
each row came from (`file.jsonl:12`), so that later validation errors can point at the line.
No format is held in memory as rows: `JsonlRows` keeps each line's byte offset and parses the
line when the row is read; a .json list (json_array.py) and a .csv file (csv_rows.py) are
indexed the same way; parquet is spooled to a temporary Arrow file read a small batch at a
time, and a hub dataset is read from its memory-mapped Arrow cache (arrow_rows.py).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from array import array
from collections.abc import Sequence
from pathlib import Path

from rlhf_cli.data.arrow_rows import HubRows, load_parquet
from rlhf_cli.data.csv_rows import CsvRows
from rlhf_cli.data.file_rows import FileRows, LineLocations
from rlhf_cli.data.json_array import JsonArrayRows, JsonLinesInstead, index_json
from rlhf_cli.errors import UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class JsonlRows(FileRows):
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
        self.locations = LineLocations(path, self._lines)

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

    def _row(self, index: int):
        start = self._offsets[index]
        end = self._offsets[index + 1] if index + 1 < len(self) else self._size
        # Up to the next row: blank lines in between are whitespace, which JSON allows.
        return _parse_line(self._read(start, end - start), self.path, self._lines[index])

    def _read(self, start: int, size: int) -> bytes:
        if hasattr(os, "pread"):  # no shared file position, no read-ahead thrown away
            return os.pread(self._handle.fileno(), size, start)
        self._handle.seek(start)
        return self._handle.read(size)



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


def load_rows(path: str, split: str = "train") -> Sequence[dict]:
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
        rows = load_parquet(path)
    elif name.endswith(".csv"):
        rows = _load_csv(path)
    else:
        raise UserError(f"unsupported data file type: {path} (expected {', '.join(SUFFIXES)})")
    return _check_nonempty(rows, path)


def _load_json(path: str) -> JsonArrayRows | JsonlRows:
    try:
        return index_json(path)
    except JsonLinesInstead:
        # A .json file that is really JSON Lines: common enough to accept
        return JsonlRows(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


def _load_csv(path: str) -> CsvRows:
    try:
        return CsvRows(path)
    except OSError as exc:
        raise UserError(f"cannot read csv file {path}: {exc}") from exc


def _load_hub(name: str, split: str) -> HubRows:
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        raise UserError(f"data file not found: {name} (HF_HUB_OFFLINE is set, so it was not "
                        "looked up as a hub dataset)")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, missing split, ...: all are input problems here
        raise UserError(f"cannot load hub dataset {name} (split {split!r}): {exc}") from exc
    return HubRows(dataset, name)


def _check_nonempty(rows, path: str):
    if not rows:
        raise UserError("no rows", where=path)
    return rows
