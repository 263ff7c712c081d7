"""The rows of a .csv file, indexed by byte offset and parsed when read (as JSON Lines are).

The header names the fields; every cell is text, and an empty cell is "" (an empty Alpaca
`input` must stay an empty string, "1.0" must not become a float). A quoted cell may hold
newlines: a row's location is the line it starts on, exactly. 16 bytes a row stay in memory.
"""

from __future__ import annotations

import csv
import io
from array import array

from rlhf_cli.data.file_rows import FileRows, LineLocations
from rlhf_cli.data.json_array import read_at
from rlhf_cli.errors import UserError


class CsvRows(FileRows):
    def __init__(self, path: str):
        self.path = path
        self._offsets, self._lines = array("q"), array("q")
        self._handle = open(path, "rb")  # held open for the rows' lifetime
        try:
            self._index()
        except UnicodeDecodeError as exc:
            self._handle.close()
            raise UserError(f"not UTF-8 text: {exc}", where=f"{path}:{self._line}") from exc
        except csv.Error as exc:
            self._handle.close()
            raise UserError(f"malformed CSV: {exc}", where=f"{path}:{self._line}") from exc
        except BaseException:
            self._handle.close()
            raise
        self.locations = LineLocations(path, self._lines)

    def _text_lines(self):
        """Decoded lines (split at "\\n" only, as `_parse` splits them), noting where each starts."""
        offset, self._line = 0, 0
        for raw in self._handle:
            self._line += 1
            self._starts.append((offset, self._line))
            offset += len(raw)
            text = raw.decode("utf-8")
            yield text[1:] if self._line == 1 and text.startswith("\ufeff") else text
        self._size = offset

    def _index(self) -> None:
        self._starts: list[tuple[int, int]] = []  # lines read for the current row
        reader = csv.reader(self._text_lines())
        self.fields = next(reader, None)
        if self.fields is None:
            self._size = 0
            return
        duplicated = sorted({f for f in self.fields if self.fields.count(f) > 1})
        if duplicated:
            raise UserError(f"duplicate column names: {', '.join(map(repr, duplicated))}",
                            where=f"{self.path}:1")
        self._starts.clear()
        for row in reader:
            offset, line = self._starts[0]
            self._starts.clear()
            if not row:  # a blank line, as pandas skips them
                continue
            if len(row) != len(self.fields):
                raise UserError(f"expected {len(self.fields)} fields as in the header, got "
                                f"{len(row)}", where=f"{self.path}:{line}")
            self._offsets.append(offset)
            self._lines.append(line)

    def _row(self, index: int):
        start = self._offsets[index]
        end = self._offsets[index + 1] if index + 1 < len(self) else self._size
        text = read_at(self._handle, start, end - start).decode("utf-8")
        cells = next(csv.reader(io.StringIO(text, newline="\n")))
        return dict(zip(self.fields, cells, strict=True))

