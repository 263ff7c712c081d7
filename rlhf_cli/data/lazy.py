"""Tokenized examples made when a batch asks for them, not all held in memory.

Tokenizing a whole data set into Python lists up front costs memory in proportion to the data
(1M short SFT rows: ~700 MB). The builders instead make one pass over the rows at start-up that
tokenizes each row once, counts the drops by reason (so the report is exact and bad rows are
errors before training) and keeps only, per kept example, its length, a checksum of its token
ids and, once some row has been dropped, the index of its row: 8 to 12 bytes. `LazyExamples`
then behaves like a list of the examples (len, indexing, slicing, iteration) and tokenizes a row
again when it is read, keeping the last few in a small cache. Rows come from `files.load_rows`,
which reads them from disk when asked, too. Tokenization is deterministic, so a re-made example
equals the one the first pass saw; its checksum is compared, so a data file changed during a
run is an error rather than silently different data.
"""

from __future__ import annotations

import operator
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rlhf_cli.errors import UserError

CACHE_SIZE = 128  # examples: more than a micro-batch, little memory even at long contexts

MakeFn = Callable[[dict, str], Any]  # (row, where) -> example dict (with "truncated") or a drop


def located(rows: Sequence, source: str):
    """(index, where, row) triples: "file.jsonl:12" when the rows know their origin, else
    "source row i"; a row that is not an object is an error naming it."""
    locations = getattr(rows, "locations", None)
    for i, row in enumerate(rows):
        where = locations[i] if locations else f"{source} row {i + 1}"
        if not isinstance(row, dict):
            raise UserError(f"expected an object, got {type(row).__name__}", where=where)
        yield i, where, row


def with_location(where: str, fn, *args):
    """Call fn, giving a location to the UserErrors that have none (e.g. template errors)."""
    try:
        return fn(*args)
    except UserError as exc:
        if exc.where is not None:
            raise
        raise UserError(str(exc), where=where) from exc


def example_length(example: dict) -> int:
    """The longest token sequence of an example (what its padding costs)."""
    return max(len(v) for k, v in example.items() if k.endswith("input_ids"))


def checksum(example: dict) -> int:
    """A CRC-32 of an example's token ids: a re-made example must have the same."""
    crc = 0
    for key in sorted(k for k in example if k.endswith("input_ids")):
        crc = zlib.crc32(array("q", example[key]).tobytes(), crc)
    return crc


class Example(dict):
    """An example read from `LazyExamples`. Assigning a key (`example["ref_logps"] = x`, as DPO's
    precomputed reference does) is remembered by the data set, so the value is still there when
    the example is made again; other dict mutations are not."""

    __slots__ = ("_store", "_position")

    def __init__(self, data: dict, store: _Store | None = None, position: int = -1):
        super().__init__(data)
        self._store, self._position = store, position

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if self._store is not None:
            self._store.remember(self._position, key, value)


class _Store:
    """What LazyExamples share: the rows, how to make an example, and the per-example index."""

    def __init__(self, rows: Sequence, source: str, make: MakeFn, kept: Sequence[int], lengths: array,
                 checksums: array, transforms: tuple = (), extra: dict | None = None):
        self.rows, self.source, self.make = rows, source, make
        self.kept, self.lengths, self.checksums = kept, lengths, checksums
        self.transforms = transforms
        self.extra: dict[str, Any] = {} if extra is None else extra  # assigned keys, by position
        self.cache: OrderedDict[int, Example] = OrderedDict()
        locations = getattr(rows, "locations", None)
        self.locations = locations if locations else None

    def where(self, index: int) -> str:
        return self.locations[index] if self.locations is not None else f"{self.source} row {index + 1}"

    def example(self, position: int) -> Example:
        hit = self.cache.get(position)
        if hit is not None:
            self.cache.move_to_end(position)
            return hit
        index = self.kept[position]
        where = self.where(index)
        result = self.make(self.rows[index], where)
        if not isinstance(result, dict) or checksum(result) != self.checksums[position]:
            raise UserError(f"{self.source} changed while it was being used: this row no longer "
                            "gives the example it gave when the data was read at start-up; do not "
                            "modify a data file during a run", where=where)
        result.pop("truncated", None)
        for transform in self.transforms:
            result = transform(result)
        example = Example(result, self, position)
        for key, column in self.extra.items():
            value = _recalled(column, position)
            if value is not _UNSET:
                dict.__setitem__(example, key, value)
        self.cache[position] = example
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return example

    def remember(self, position: int, key: str, value) -> None:
        column = self.extra.get(key)
        if column is None:
            # Floats (reference log-probs) in 9 bytes an example; anything else by position.
            column = ((np.full(len(self.kept), np.nan), np.zeros(len(self.kept), dtype=bool))
                      if isinstance(value, float) else {})
            self.extra[key] = column
        if isinstance(column, tuple) and not isinstance(value, float):
            column = self.extra[key] = {p: float(column[0][p]) for p in np.flatnonzero(column[1])}
        if isinstance(column, tuple):
            column[0][position], column[1][position] = value, True
        else:
            column[position] = value

    def derive(self, transform: Callable[[dict], dict]) -> _Store:
        return _Store(self.rows, self.source, self.make, self.kept, self.lengths, self.checksums,
                      self.transforms + (transform,), self.extra)


_UNSET = object()


def _recalled(column, position: int):
    if isinstance(column, tuple):
        return float(column[0][position]) if column[1][position] else _UNSET
    return column.get(position, _UNSET)


class LazyExamples(Sequence):
    """The kept examples of a data set, tokenized when read; slices are views, not copies."""

    def __init__(self, store: _Store, positions: range | None = None):
        self._store = store
        self._positions = range(len(store.kept)) if positions is None else positions

    @classmethod
    def build(cls, rows: Sequence, source: str, make: MakeFn, report) -> LazyExamples:
        """One pass over `rows`: every row is made once (errors surface now), drops and truncations
        are counted in `report` (a DropReport), and only the kept rows' indices and lengths stay."""
        kept: array | range | None = None  # None while every row so far is kept
        lengths, checksums = array("i"), array("I")
        for index, where, row in located(rows, source):
            result = make(row, where)
            if not isinstance(result, dict):
                report.dropped[result] += 1
                if kept is None:
                    kept = array("i" if len(rows) < 2**31 else "q", range(len(lengths)))
                continue
            report.truncated.update(result.get("truncated", ()))
            if kept is not None:
                kept.append(index)
            lengths.append(example_length(result))
            checksums.append(checksum(result))
        report.kept = len(lengths)
        kept = range(len(lengths)) if kept is None else kept
        return cls(_Store(rows, source, make, kept, lengths, checksums))

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyExamples(self._store, self._positions[index])
        return self._store.example(self._positions[operator.index(index)])

    def __iter__(self):
        # Not Sequence's: that stops at the first IndexError, even one from inside a row.
        for position in self._positions:
            yield self._store.example(position)

    def map(self, transform: Callable[[dict], dict]) -> LazyExamples:
        """The same examples with `transform` applied to each as it is made."""
        return LazyExamples(self._store.derive(transform), self._positions)

    @property
    def lengths(self) -> Sequence[int]:
        """Each example's longest token sequence, known without tokenizing (for length grouping)."""
        positions, lengths = self._positions, self._store.lengths
        if positions == range(len(lengths)):
            return lengths
        return array("i", (lengths[p] for p in positions))

    def row_index(self, i: int) -> int:
        """The index, in the rows it was made from, of example i."""
        return self._store.kept[self._positions[i]]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"LazyExamples({len(self)} examples of {self._store.source})"
