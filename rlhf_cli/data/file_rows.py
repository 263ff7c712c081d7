"""What the file-backed row sequences share (JSON lines, JSON arrays, CSV, Arrow spools): equality with
any sequence of the same rows, no hashing, a short repr, closing the file; and the
`file:LINE` locations of line-based formats, computed rather than stored.

`Rows`, the in-memory list a slice of any of them returns, lives here rather than in
files.py, which imports every format: the formats then import nothing that imports them."""

from __future__ import annotations

from array import array
from collections.abc import Sequence


class Rows(list):
    """A list of row dicts plus `locations[i]`, a human-readable origin of row i."""

    def __init__(self, rows: list[dict], locations: list[str]):
        super().__init__(rows)
        self.locations = locations


class FileRows(Sequence):
    """Subclasses set `path`, `_handle` (the open file), `_offsets` (one entry a row, or their
    own __len__) and `locations`, and read row i in `_row(i)`; a slice is a list of rows that
    keeps their locations."""

    path: str

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            picked = range(len(self))[index]
            return Rows([self[i] for i in picked], [self.locations[i] for i in picked])
        return self._row(range(len(self))[index])  # negative indices; IndexError out of range

    def _row(self, index: int):
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {len(self)} rows)"

    def close(self) -> None:
        self._handle.close()


class LineLocations(Sequence):
    """`locations[i]` = `file:LINE` of row i, from an array of line numbers."""

    def __init__(self, path: str, lines: array):
        self.path, self.lines = path, lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [f"{self.path}:{line}" for line in self.lines[index]]
        return f"{self.path}:{self.lines[index]}"
