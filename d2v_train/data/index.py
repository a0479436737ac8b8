"""A split's sample table, read from dataset.json and the Parquet indexes alone (no tar is opened)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipelines.inspection import read_dataset
from pipelines.shards import read_parquet
from pipelines.storage import Location, join
from schemas import Dataset, ShardInfo
from schemas.arrow import LENGTH_COLUMN, SPAN_COLUMNS


@dataclass
class SplitIndex:
    """One row per sample of a split, in shard order then tar order; columns are numpy arrays
    (speech also has "transcript", an object array with None where there is none)."""

    dataset: Dataset
    location: Location
    split: str
    shards: list[ShardInfo]
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["key"])

    @property
    def modality(self) -> str:
        return self.dataset.modality

    @property
    def lengths(self) -> np.ndarray:
        """Speech: samples of audio; text: tokens; vision: 1 (batches of images have a fixed size)."""
        return self.columns["length"]

    def select(self, rows: np.ndarray) -> SplitIndex:
        """The same split restricted to `rows` (positions, kept in their order): a labelled subset.
        Shards keep their numbers; a shard with no selected row is simply never read."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"row positions outside the {len(self)} samples of split {self.split!r}")
        return SplitIndex(self.dataset, self.location, self.split, self.shards,
                          {name: values[rows] for name, values in self.columns.items()})

    @classmethod
    def load(cls, location: Location, split: str, *, threads: int = 16) -> SplitIndex:
        dataset, fs, root = read_dataset(location)
        shards = dataset.shards_of(split)
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
            tables = list(pool.map(lambda shard: read_parquet(fs, join(root, shard.index)), shards))
        columns: dict[str, list] = {name: [] for name in ("key", "shard", "length", "label", "mask_length", "payload_crc32",
                                                          *SPAN_COLUMNS)}
        for number, (shard, table) in enumerate(zip(shards, tables)):
            if table.num_rows != shard.samples:
                raise ValueError(f"{shard.index} has {table.num_rows} rows but dataset.json says {shard.samples}")
            rows = table.num_rows
            columns["key"].append(np.asarray(table.column("key").to_pylist(), dtype=object))
            columns["shard"].append(np.full(rows, number, dtype=np.int32))
            for name in ("mask_length", *SPAN_COLUMNS):
                columns[name].append(table.column(name).to_numpy().astype(np.int64))
            columns["payload_crc32"].append(  # -1: not recorded (an index of an older build)
                table.column("payload_crc32").to_numpy().astype(np.int64) if "payload_crc32" in table.column_names
                else np.full(rows, -1, dtype=np.int64))
            length_column = LENGTH_COLUMN.get(dataset.modality)
            length = (table.column(length_column).to_numpy().astype(np.int64) if length_column
                      else np.ones(rows, dtype=np.int64))
            columns["length"].append(length)
            label = table.column("label").to_numpy().astype(np.int64) if "label" in table.column_names \
                else np.full(rows, -1, dtype=np.int64)
            columns["label"].append(label)
            for name in ("transcript", "speaker"):  # speech: None where there is none
                if name in table.column_names:
                    columns.setdefault(name, []).append(np.asarray(table.column(name).to_pylist(), dtype=object))
        merged = {name: (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
                  for name, parts in columns.items()}
        return cls(dataset, location, split, shards, merged)
