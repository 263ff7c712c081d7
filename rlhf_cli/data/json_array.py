"""A .json file's rows (a list of objects, or an object with a "data"/"train" list), indexed.

`json.load` would hold the whole text and then every row as a dict. Instead the file is read in
chunks and each element of the list is parsed once (so a malformed or non-object element is an
error before training) and then dropped: only its byte offset and size stay (12 bytes a row).
A row is parsed again from those bytes when it is read.
"""

from __future__ import annotations

import codecs
import json
import os
from array import array
from collections.abc import Sequence

from rlhf_cli.data.file_rows import FileRows
from rlhf_cli.errors import UserError

CHUNK = 1 << 20  # bytes read at a time
_WHITESPACE = " \t\n\r"


def read_at(handle, start: int, size: int) -> bytes:
    """`size` bytes at `start` of an open binary file."""
    if hasattr(os, "pread"):  # no shared file position, no read-ahead thrown away
        return os.pread(handle.fileno(), size, start)
    handle.seek(start)
    return handle.read(size)


class JsonLinesInstead(Exception):
    """The file holds more than one top-level value: it is JSON Lines with a .json name."""


class _Reader:
    """A window of decoded text over a binary file, with byte offsets and line numbers."""

    def __init__(self, handle, path: str):
        self.handle, self.path = handle, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.eof = "", 0, False
        # Where text[0] is in the file: byte offset, line and column (0-based). `mark` is a
        # (char, byte) pair within text from which byte offsets are counted, so that every
        # character is encoded once.
        self.base_byte, self.base_line, self.base_column = 0, 1, 0
        self.mark_char, self.mark_byte = 0, 0

    def fill(self, size: int = CHUNK) -> bool:
        if self.eof:
            return False
        data = self.handle.read(size)
        try:
            self.text += self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            line = self.line_at(len(self.text))
            raise UserError(f"not UTF-8 text: {exc}", where=f"{self.path}:{line}") from exc
        self.eof = not data
        return True

    def byte_at(self, char: int) -> int:
        """The file offset of text[char] (char >= the last position asked about)."""
        piece = self.text[self.mark_char:char]
        self.mark_byte += len(piece) if piece.isascii() else len(piece.encode("utf-8"))
        self.mark_char = char
        return self.base_byte + self.mark_byte

    def line_at(self, char: int) -> int:
        return self.base_line + self.text.count("\n", 0, char)

    def column_at(self, char: int) -> int:
        """1-based, as json reports it."""
        newline = self.text.rfind("\n", 0, char)
        return char - newline if newline >= 0 else self.base_column + char + 1

    def compact(self) -> None:
        """Drop the text already indexed once it is long, keeping offsets and lines right."""
        if self.pos <= CHUNK:
            return
        cut = self.pos
        self.base_byte = self.byte_at(cut)
        self.base_column = self.column_at(cut) - 1
        self.base_line = self.line_at(cut)
        self.text, self.pos = self.text[cut:], 0
        self.mark_char, self.mark_byte = 0, 0

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end), without consuming it."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos:self.pos + 1]

    def expect(self, chars: str, what: str) -> str:
        found = self.peek()
        if not found or found not in chars:
            self.malformed(what, self.pos)
        self.pos += 1
        return found

    def malformed(self, message: str, char: int):
        line = self.line_at(char)
        raise UserError(f"malformed JSON: {message}: line {line} column {self.column_at(char)}",
                        where=f"{self.path}:{line}")

    def value(self, decoder: json.JSONDecoder):
        """Parse the next value, reading more text until it is complete; (value, start, end)."""
        self.peek()
        size = CHUNK
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                # Input cut short by the window fails at its end, or as a string that never ends;
                # then read more and retry. Any other failure is in the file.
                cut_short = exc.pos >= len(self.text) - 16 or exc.msg.startswith("Unterminated")
                if cut_short and self.fill(size):
                    size *= 2
                    continue
                self.malformed(exc.msg, exc.pos)
            if end == len(self.text) and self.fill(size):  # a number may go on
                continue
            start, self.pos = self.pos, end
            return value, start, end


def index_json(path: str) -> JsonArrayRows:
    """Index the rows of a .json file; raises JsonLinesInstead for JSON Lines."""
    handle = open(path, "rb")  # held open for the rows' lifetime
    try:
        offsets, sizes = _index(_Reader(handle, path))
    except BaseException:
        handle.close()
        raise
    return JsonArrayRows(path, handle, offsets, sizes)


def _index(reader: _Reader) -> tuple[array, array]:
    decoder = json.JSONDecoder()
    first = reader.peek()
    if first == "[":
        found = _index_list(reader, decoder)
    elif first == "{":
        found = _index_object(reader, decoder)
    else:
        value = reader.value(decoder)[0]  # a malformed file is an error here
        raise UserError(f"{reader.path}: expected a list of objects, got {type(value).__name__}")
    if reader.peek():
        raise JsonLinesInstead
    return found


def _index_list(reader: _Reader, decoder: json.JSONDecoder) -> tuple[array, array]:
    offsets, sizes = array("q"), array("q")
    reader.expect("[", "expected '['")
    if reader.peek() == "]":
        reader.pos += 1
        return offsets, sizes
    while True:
        row, start, end = reader.value(decoder)
        if not isinstance(row, dict):
            raise UserError(f"expected a JSON object, got {type(row).__name__}",
                            where=f"{reader.path} row {len(offsets) + 1}")
        offset = reader.byte_at(start)
        offsets.append(offset)
        sizes.append(reader.byte_at(end) - offset)
        reader.compact()
        if reader.expect(",]", "expected ',' or ']' after a list item") == "]":
            return offsets, sizes


def _index_object(reader: _Reader, decoder: json.JSONDecoder) -> tuple[array, array]:
    """The "data" list of the object, else its "train" list (the last of each key counts)."""
    lists: dict[str, tuple[array, array] | None] = {}
    reader.expect("{", "expected '{'")
    closing = reader.peek() == "}"
    while not closing:
        key = reader.value(decoder)[0]
        if not isinstance(key, str):
            reader.malformed("expected a property name in double quotes", reader.pos)
        reader.expect(":", "expected ':' after a property name")
        if key in ("data", "train") and reader.peek() == "[":
            lists[key] = _index_list(reader, decoder)
        else:
            reader.value(decoder)  # parsed and dropped
            if key in ("data", "train"):
                lists[key] = None
        reader.compact()
        closing = reader.expect(",}", "expected ',' or '}' after a property") == "}"
    if reader.peek():  # more values follow: JSON Lines, judged by the caller
        raise JsonLinesInstead
    found = lists.get("data") if lists.get("data") is not None else lists.get("train")
    if found is None:
        raise UserError(f"{reader.path}: expected a list of objects, or an object with a 'data' or "
                        "'train' list")
    return found


class JsonArrayRows(FileRows):
    """The rows of a .json list, parsed on demand from their byte ranges."""

    def __init__(self, path: str, handle, offsets: array, sizes: array):
        self.path, self._handle = path, handle
        self._offsets, self._sizes = offsets, sizes
        self.locations = _RowLocations(path, len(offsets))

    def _row(self, index: int):
        return json.loads(read_at(self._handle, self._offsets[index], self._sizes[index]))


class _RowLocations(Sequence):
    """`file.json row N`, computed rather than stored."""

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [f"{self.path} row {i + 1}" for i in range(self.size)[index]]
        return f"{self.path} row {range(self.size)[index] + 1}"
