"""Rows of .parquet files and of hub datasets, read as they are asked for.

Parquet is columnar and compressed in row groups, so a row cannot be read at a byte offset as a
JSON line can, and a row group may hold a million rows. The file is streamed once (a column
chunk 1 MB at a time) into an anonymous temporary Arrow IPC file of small record batches
(`BATCH_ROWS` rows, lz4-compressed); a row is then read by loading its batch from that file. In
memory: the batch boundaries and the last few batches read, never all the rows (Arrow's columns
would be compact, but still grow with the data). The file is deleted when closed or when the
process ends; it is written to the temporary directory, so set TMPDIR to a disk when /tmp is in
memory.
"""

from __future__ import annotations

import tempfile
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from rlhf_cli.data.file_rows import FileRows, Rows
from rlhf_cli.errors import UserError

BATCH_ROWS = 256  # a random read decodes this many rows
CACHED_BATCHES = 8


class ArrowRows(FileRows):
    """The rows of a stream of Arrow record batches, spooled to a temporary file."""

    def __init__(self, batches: Iterator, schema, locate):
        """`batches`: pyarrow RecordBatches (any sizes), `locate(i)`: where row i came from."""
        import pyarrow as pa

        self._handle = tempfile.TemporaryFile(prefix="rlhf-rows-", suffix=".arrow")
        self._starts = array("q", [0])  # first row of each stored batch, then the total
        codec = "lz4" if pa.Codec.is_available("lz4") else None
        sink = pa.PythonFile(self._handle, mode="w")
        with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as out:
            for batch in batches:
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    piece = batch.slice(start, BATCH_ROWS)
                    out.write_batch(piece)
                    self._starts.append(self._starts[-1] + piece.num_rows)
        self._handle.seek(0)
        self._reader = pa.ipc.open_file(pa.PythonFile(self._handle, mode="r"))
        self._cache: OrderedDict[int, object] = OrderedDict()
        self.locations = _Locations(locate, len(self))

    def __len__(self) -> int:
        return self._starts[-1]

    def _batch(self, k: int):
        batch = self._cache.get(k)
        if batch is None:
            batch = self._cache[k] = self._reader.get_batch(k)
            if len(self._cache) > CACHED_BATCHES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(k)
        return batch

    def _row(self, index: int):
        k = bisect_right(self._starts, index) - 1
        return self._batch(k).slice(index - self._starts[k], 1).to_pylist()[0]

    def __iter__(self):
        for k in range(len(self._starts) - 1):  # a batch at a time: no per-row slicing
            yield from self._reader.get_batch(k).to_pylist()

    def __repr__(self) -> str:  # a temporary spool file: no path worth showing
        return f"ArrowRows({len(self)} rows)"


class _Locations(Sequence):
    def __init__(self, locate, size: int):
        self.locate, self.size = locate, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.locate(i) for i in range(self.size)[index]]
        return self.locate(range(self.size)[index])


def load_parquet(path: str) -> ArrowRows:
    import pyarrow.parquet as pq

    try:
        # pre_buffer would read every row group ahead; without buffer_size a whole column chunk
        source = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        batches = source.iter_batches(batch_size=16 * BATCH_ROWS, use_threads=False)
        return ArrowRows(batches, source.schema_arrow, lambda i: f"{path} row {i + 1}")
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise UserError(f"cannot read parquet file {path}: {exc}") from exc


class HubRows(Sequence):
    """A hub dataset's rows, read from its memory-mapped Arrow cache when asked for."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name
        self.locations = _Locations(lambda i: f"{name} row {i + 1}", len(dataset))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            picked = range(len(self))[index]
            return Rows([self[i] for i in picked], [self.locations[i] for i in picked])
        return self.dataset[range(len(self))[index]]

    def __iter__(self):
        return iter(self.dataset)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None
