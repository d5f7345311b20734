"""A source opened for reading: its format, its conversations column, and its rows in a seeded order, read a
chunk at a time.

Hub datasets and local files are read through `datasets` (fika.sources.load_source), which keeps their rows in
Arrow files on disk: a chunk is taken from those files when it is read, so a large source is never a Python list
before its first row is tokenized. The built-in ShareGPT is a list of records (its JSON array is decoded whole).

Those Arrow files are memory-mapped here with the kernel told that reads are random, and the pages a chunk read
are unmapped after it: read in a shuffled order, a mapping otherwise ends up holding the whole file (each fault
maps its neighbours too, as many as the disk's read-ahead: 8 MB on some machines), and the process's resident
memory grows with the source.
"""

from __future__ import annotations

import mmap
import random
from collections.abc import Sequence
from dataclasses import dataclass

from fika.config import DataSource
from fika.sources import STANDARDIZERS, DataError, Dropped, detect_format, load_source

NOT_UTF8 = Dropped("malformed")  # stands for a row whose bytes are not UTF-8 (Arrow keeps a file's text as read)


@dataclass
class SourceRows:
    """A source's rows in its seeded order: `values(start, stop)` is the conversations column of the rows at
    positions start..stop-1 of that order."""

    path: str
    fmt: str
    column: str
    note: str
    rows: Sequence  # a list of records (the built-in ShareGPT), or an ArrowColumn
    order: list[int]

    def values(self, start: int, stop: int) -> list:
        indices = self.order[start:stop]
        if isinstance(self.rows, list):
            return [self.rows[i][self.column] for i in indices]
        return self.rows.take(indices)


class ArrowColumn:
    """One column of a `datasets` dataset, read from its Arrow files a few rows at a time; the file pages a read
    mapped are released after it (see the module's docstring)."""

    def __init__(self, files: list[str], column: str):
        import pyarrow as pa

        self.maps, tables = [], []
        for name in files:
            with open(name, "rb") as file:
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mapped.madvise(mmap.MADV_RANDOM)
            self.maps.append(mapped)
            tables.append(pa.ipc.open_stream(pa.py_buffer(mapped)).read_all().select([column]))
        self.table = pa.concat_tables(tables)

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, indices: list[int]) -> list:
        """The values of these rows; NOT_UTF8 for a row whose text is not UTF-8."""
        values = [self.value(i) for i in indices]
        for mapped in self.maps:
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)  # a read-only file mapping: its pages stay in the page cache
        return values

    def value(self, i: int) -> object:
        try:
            return self.table.slice(i, 1).column(0)[0].as_py()
        except UnicodeDecodeError:
            return NOT_UTF8


def open_source(source: DataSource, seed: int) -> SourceRows:
    """Opens a source (fika.sources.load_source), tells its format and shuffles its row order with `seed`."""
    rows, columns, note = load_source(source)
    fmt = source.format if source.format != "auto" else detect_format(columns, rows, source.path)
    column = STANDARDIZERS[fmt][0]
    if column not in columns:
        raise DataError(f"data source {source.path!r}: format {fmt!r} needs a {column!r} column, found {columns[:12]}")
    if not isinstance(rows, list):
        rows = arrow_column(rows, column)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return SourceRows(source.path, fmt, column, note, rows, order)


def arrow_column(dataset, column: str) -> Sequence:
    """The column of a `datasets.Dataset` as an ArrowColumn over its files; the dataset itself (which reads a
    chunk through its own memory map) when its rows are not exactly those files' rows."""
    files = [entry["filename"] for entry in dataset.cache_files]
    if files:
        rows = ArrowColumn(files, column)
        if len(rows) == len(dataset):
            return rows
    return DatasetColumn(dataset.select_columns([column]), column)


@dataclass
class DatasetColumn:
    """One column of a `datasets.Dataset` held in memory (or with an order of its own), read by `datasets`."""

    dataset: object
    column: str

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, indices: list[int]) -> list:
        try:
            return self.dataset[indices][self.column]
        except UnicodeDecodeError:  # one of them is not UTF-8: read one at a time, that one stands for a drop
            return [readable(self.dataset, i, self.column) for i in indices]


def readable(rows: Sequence, i: int, column: str) -> object:
    """Row `i`'s value in `column`, or NOT_UTF8 when its text is not UTF-8."""
    try:
        return rows[i][column]
    except UnicodeDecodeError:
        return NOT_UTF8
