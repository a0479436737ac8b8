"""Deterministic shard plans: the same manifest, seed and size give the same shards.

Items of a split are put in a stable order (sorted by id), shuffled with a seed derived from
(seed, split) so a shard mixes speakers/classes/documents, then cut into consecutive shards
by a byte budget (or a sample count). A shard's fingerprint names exactly what it will hold,
so a resumed build can trust a finished shard only if its fingerprint matches.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class ShardSize:
    """A shard's budget: bytes (e.g. "256MB", estimated from the source sizes plus a fixed
    per-sample overhead) or a number of samples (e.g. "1000")."""

    max_bytes: int | None = None
    max_samples: int | None = None

    @classmethod
    def parse(cls, text: str | int) -> ShardSize:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"--shard-size {text!r}: expected a sample count (1000) or a size (256MB, 1GiB)")
        number, unit = match.groups()
        if unit is None:
            if "." in number or int(number) < 1:
                raise ValueError(f"--shard-size {text!r}: a sample count must be a positive whole number")
            return cls(max_samples=int(number))
        size = int(float(number) * _UNITS[unit.upper()])
        if size < 1:
            raise ValueError(f"--shard-size {text!r} must be positive")
        return cls(max_bytes=size)

    def describe(self) -> str:
        return f"{self.max_samples} samples" if self.max_samples else f"{self.max_bytes} bytes"


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    rows: tuple[dict, ...]  # manifest rows, in the order they are written
    fingerprint: str

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.number:06d}"

    @property
    def tar_path(self) -> str:
        return f"shards/{self.stem}.tar"

    @property
    def index_path(self) -> str:
        return f"index/{self.stem}.parquet"


def split_seed(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])


def shard_seed(seed: int, split: str, number: int) -> np.random.Generator:
    """The generator of one shard's masks: independent of which worker builds it, or when."""
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), number, 1])


def plan_shards(manifest: pa.Table, *, seed: int, size: ShardSize, build_fingerprint: str,
                size_column: str = "bytes") -> list[ShardPlan]:
    """Cut each split of the manifest into shards; splits in sorted order, shards numbered per split."""
    plans: list[ShardPlan] = []
    splits = manifest.column("split").to_pylist()
    ids = manifest.column("id").to_pylist()
    rows = manifest.to_pylist()
    for split in sorted(set(splits)):
        members = sorted((i for i, s in enumerate(splits) if s == split), key=lambda i: ids[i])
        order = split_seed(seed, split).permutation(len(members))
        ordered = [rows[members[j]] for j in order]
        for number, chunk in enumerate(_cut(ordered, size, size_column)):
            plans.append(ShardPlan(split, number, tuple(chunk), _fingerprint(build_fingerprint, split, number, chunk)))
    return plans


# What a sample adds to its tar beside its data: three 512-byte headers, padding, JSON and masks.
SAMPLE_OVERHEAD_BYTES = 4096


def _cut(rows: list[dict], size: ShardSize, size_column: str) -> list[list[dict]]:
    chunks: list[list[dict]] = []
    current: list[dict] = []
    current_bytes = 0
    for row in rows:
        row_bytes = row[size_column] + SAMPLE_OVERHEAD_BYTES
        full = (size.max_samples is not None and len(current) >= size.max_samples) or (
            size.max_bytes is not None and current and current_bytes + row_bytes > size.max_bytes
        )
        if full:
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(row)
        current_bytes += row_bytes
    if current:
        chunks.append(current)
    return chunks


def _fingerprint(build_fingerprint: str, split: str, number: int, rows: list[dict]) -> str:
    digest = hashlib.sha256(f"{build_fingerprint}\n{split}\n{number}\n".encode())
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
