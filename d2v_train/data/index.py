"""A split's sample table, read from dataset.json and the Parquet indexes alone (no tar is opened).

Columnar and lazy, so that a split of 10 million samples in 10,000 index files is ready in
seconds: opening it reads the split's plan file (the one column batches are planned by: lengths,
or the labels of images; for builds without one, that column of every index file in parallel
threads); any other column is read for the whole split when
first asked for (`index.columns[name]`), and the loader takes the few rows a batch needs from the
index files of their shards (`index.gather`), kept in a small cache, instead of holding every
span of every sample. Strings stay in Arrow buffers (StringColumn), never one object per row.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.inspection import read_dataset
from pipelines.shards import PlanFileError, check_rows, read_index_column, read_parquet, read_plan_column
from pipelines.storage import Location, join
from schemas import Dataset, ShardInfo
from schemas.arrow import LENGTH_COLUMN, index_schema
from schemas.dataset import PLAN_COLUMN

# what a column holds where an index file has none: an older build (no checksum), no labels
_DEFAULTS = {"payload_crc32": -1, "label": -1}
SHARD_TABLES_CACHED = 64  # whole shard index tables the loader keeps (about 0.1 MB each at 1,000 samples)


class StringColumn:
    """A column of strings (None where there is none) kept in Arrow's buffers instead of one Python
    object per row: the keys of 10 million samples take about 180 MB so, against 700 MB as Python
    strings. A row gives a str (or None); positions, a boolean mask or a slice give a StringColumn;
    iteration, tolist() and numpy conversion give Python objects."""

    def __init__(self, array: pa.Array) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, item):
        if isinstance(item, (int, np.integer)):
            return self.array[int(item)].as_py()
        if isinstance(item, slice):
            return StringColumn(self.array[item])
        rows = np.asarray(item)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return StringColumn(self.array.take(pa.array(rows.astype(np.int64, copy=False), type=pa.int64())))

    def __iter__(self):
        return iter(self.array.to_pylist())

    def tolist(self) -> list:
        return self.array.to_pylist()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.array.to_pylist(), dtype=object)


def _as_column(chunks: list[pa.Array]) -> np.ndarray | StringColumn:
    """Index pieces joined: numbers as int64, strings as one StringColumn."""
    if chunks and pa.types.is_string(chunks[0].type):
        if sum(chunk.nbytes for chunk in chunks) >= 2**31 - 1:  # past Arrow's 32-bit string offsets
            chunks = [chunk.cast(pa.large_string()) for chunk in chunks]
        return StringColumn(pa.concat_arrays(chunks))
    return np.concatenate([chunk.to_numpy(zero_copy_only=False).astype(np.int64, copy=False) for chunk in chunks]) \
        if chunks else np.zeros(0, dtype=np.int64)


class IndexFiles:
    """The index files of one split: whole columns of the split, and whole tables of one shard."""

    def __init__(self, dataset: Dataset, fs, root: str, shards: list[ShardInfo], threads: int) -> None:
        self.dataset, self.fs, self.root, self.shards, self.threads = dataset, fs, root, shards, threads
        self.names = set(index_schema(dataset.modality).names)
        counts = np.array([s.samples for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # each shard's first row
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, number: int, columns: list[str] | None = None) -> pa.Table:
        """Shard `number`'s index table; an unreadable one is a ShardError naming the shard and its index."""
        from d2v_train.data.reader import ShardError

        shard = self.shards[number]
        try:
            table = read_parquet(self.fs, join(self.root, shard.index), columns)
        except Exception as exc:  # noqa: BLE001 - pyarrow reports a damaged file in many ways
            raise ShardError(shard.name, f"its index {shard.index} cannot be read: {type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())}") from None
        return check_rows(shard.index, table, shard.samples)

    def column(self, name: str) -> np.ndarray | StringColumn:
        """One column of every index file, in parallel, joined in shard order."""
        if name not in self.names:  # a column no index of this modality has
            return np.full(int(self.starts[-1]), _DEFAULTS[name], dtype=np.int64)
        indexes = [(shard.index, shard.samples) for shard in self.shards]
        return _as_column(read_index_column(self.fs, self.root, indexes, name, threads=self.threads,
                                            default=_DEFAULTS.get(name)))

    def plan_column(self, split: str) -> np.ndarray:
        """PLAN_COLUMN of the split: from its plan file where the build wrote one (one read, its
        sha256 checked), else from every index file."""
        name, summary = PLAN_COLUMN[self.dataset.modality], self.dataset.splits[split]
        if summary.plan is None:
            return self.column(name)
        try:
            return _as_column([read_plan_column(self.fs, self.root, summary, name)])
        except PlanFileError as exc:
            raise ValueError(f"{summary.plan}: {exc} (rebuild, or remove the file's entry to read every index "
                             "instead)") from None

    def table(self, number: int) -> pa.Table:
        """Shard `number`'s whole index (the most recently used ones cached)."""
        with self._lock:
            if number in self._tables:
                self._tables.move_to_end(number)
                return self._tables[number]
        table = self.read(number)
        with self._lock:
            self._tables[number] = table
            while len(self._tables) > SHARD_TABLES_CACHED:
                self._tables.popitem(last=False)
        return table


class IndexColumns(Mapping):
    """A split's columns by name, read on first use: "shard" (position in the split's shard list),
    "length" (speech: audio samples, text: tokens, images: 1), "label" (-1 where there is none),
    "payload_crc32" (-1 where not recorded) and every column of the index schema ("key", the span
    columns, "transcript", "speaker", ...). `positions`: this view's rows among the split's (a
    labelled subset), None for all of them in shard order."""

    def __init__(self, files: IndexFiles, positions: np.ndarray | None, loaded: dict) -> None:
        self.files, self.positions, self._loaded = files, positions, loaded
        self._lock = threading.Lock()

    def _names(self) -> list[str]:
        return ["shard", "length", *sorted(self.files.names | set(_DEFAULTS))]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._loaded or name in self._names()

    def __getitem__(self, name: str):
        if name not in self._loaded:
            if name not in self:
                raise KeyError(name)
            full = self.files.column(name)
            with self._lock:
                if name not in self._loaded:
                    self._loaded[name] = full if self.positions is None else full[self.positions]
        return self._loaded[name]

    def __setitem__(self, name: str, values) -> None:
        self._loaded[name] = values

    def select(self, rows: np.ndarray) -> IndexColumns:
        positions = rows if self.positions is None else self.positions[rows]
        return IndexColumns(self.files, positions, {name: values[rows] for name, values in self._loaded.items()})

    def gather(self, rows: np.ndarray, names: tuple[str, ...]) -> list[list]:
        """The values of `names` at `rows` (positions in this view), as Python lists: from a column
        already read, else from the index tables of the rows' shards alone."""
        out: list[list | None] = [self._loaded[n][rows].tolist() if n in self._loaded else None for n in names]
        missing = [i for i, values in enumerate(out) if values is None]
        if missing:
            full = rows if self.positions is None else self.positions[rows]
            shard_of = self._loaded["shard"][rows]
            for i in missing:
                out[i] = [None] * len(rows)
            for shard in np.unique(shard_of).tolist():
                mine = np.flatnonzero(shard_of == shard)
                table = self.files.table(shard)
                within = pa.array(full[mine] - self.files.starts[shard], type=pa.int64())
                for i in missing:
                    name = names[i]
                    values = table.column(name).take(within).to_pylist() if name in table.column_names \
                        else [_DEFAULTS[name]] * len(mine)
                    for j, value in zip(mine.tolist(), values):
                        out[i][j] = value
        return out


class PlannedIndex:
    """What the plan, the loader and the reader use of an index (a split's, or a mix's: mix.py);
    subclasses hold `dataset` and `columns`."""

    @property
    def modality(self) -> str:
        return self.dataset.modality

    @property
    def lengths(self) -> np.ndarray:
        """Speech: samples of audio; text: tokens; vision: 1 (batches of images have a fixed size)."""
        return self.columns["length"]

    def gather(self, rows: np.ndarray, names: tuple[str, ...]) -> list[list]:
        """`names` at `rows` as lists (what a batch's requests and collation need)."""
        return self.columns.gather(np.asarray(rows, dtype=np.int64), names)


@dataclass
class SplitIndex(PlannedIndex):
    """One row per sample of a split, in shard order then tar order; `columns` reads each column
    when first used (numbers as int64 numpy arrays, strings as StringColumn)."""

    dataset: Dataset
    location: Location
    split: str
    shards: list[ShardInfo]
    columns: IndexColumns

    def __len__(self) -> int:
        return len(self.columns["shard"])

    def select(self, rows: np.ndarray) -> SplitIndex:
        """The same split restricted to `rows` (positions, kept in their order): a labelled subset.
        Shards keep their numbers; a shard with no selected row is simply never read."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"row positions outside the {len(self)} samples of split {self.split!r}")
        return SplitIndex(self.dataset, self.location, self.split, self.shards, self.columns.select(rows))

    # what a mix of several splits (mix.MixedIndex) has more of: one location, one mask set, each row once
    @property
    def locations(self) -> list[Location]:
        return [self.location]

    @property
    def shard_sources(self) -> list[int]:
        return [0] * len(self.shards)

    @property
    def mask_variants(self) -> int:
        return self.dataset.mask.variants

    def multiplicity(self, seed: int, epoch: int) -> np.ndarray | None:
        return None

    @classmethod
    def load(cls, location: Location, split: str, *, threads: int = 16) -> SplitIndex:
        """dataset.json and the column batches are planned by (lengths; images: labels): from the
        split's plan file, else from every index file in parallel threads; the rest on first use."""
        dataset, fs, root = read_dataset(location)
        shards = dataset.shards_of(split)
        files = IndexFiles(dataset, fs, root, shards, threads)
        counts = np.diff(files.starts)
        loaded: dict = {"shard": np.repeat(np.arange(len(shards), dtype=np.int32), counts)}
        planned_by = files.plan_column(split)  # lengths; images: labels
        if LENGTH_COLUMN.get(dataset.modality):
            loaded["length"] = planned_by
        else:
            loaded["label"] = planned_by
            loaded["length"] = np.ones(len(loaded["shard"]), dtype=np.int64)
        return cls(dataset, location, split, shards, IndexColumns(files, None, loaded))
