"""Writing one WebDataset shard: a deterministic POSIX tar plus its Parquet index.

The same samples in the same order give byte-identical tars: fixed mtime, owner and mode.
Each index row records where each member's bytes start in the tar, so a reader can fetch a
sample (or a run of samples) with one ranged read and never scan the tar.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.arrow import JSON_SUFFIX, MASK_SUFFIX, payload_crc32

# Keys written into the Parquet footer: what a resumed build needs to trust a finished shard.
META_SHA256 = b"d2v.sha256"
META_TAR_BYTES = b"d2v.tar_bytes"
META_FINGERPRINT = b"d2v.fingerprint"
META_REJECTS = b"d2v.rejects"
META_SUMMARY = b"d2v.summary"

_BLOCK = tarfile.BLOCKSIZE


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


@dataclass(frozen=True)
class MemberSpan:
    offset: int  # where the member's data starts in the tar
    size: int


class TarShardWriter:
    """Appends samples (a key and its members) to an in-memory tar and records member offsets."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> tuple[int, int, dict[str, MemberSpan]]:
        """Write `{key}.{suffix}` for each member; return (sample offset, sample bytes, spans)."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        start = self._tar.offset
        spans: dict[str, MemberSpan] = {}
        for suffix, data in members:
            info = tarfile.TarInfo(name=f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            spans[suffix] = MemberSpan(self._tar.offset - _padded(len(data)), len(data))
        self.samples += 1
        return start, self._tar.offset - start, spans

    def finish(self) -> bytes:
        self._tar.close()
        return self._buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_row(key: str, sample_offset: int, sample_bytes: int, spans: dict[str, MemberSpan], data_suffix: str,
              mask_length: int, extra: dict, payloads: dict[str, bytes]) -> dict:
    """The index row of one sample written by TarShardWriter.add; `payloads` are its members' bytes."""
    data, meta, mask = spans[data_suffix], spans[JSON_SUFFIX], spans[MASK_SUFFIX]
    return {
        "key": key,
        "sample_offset": sample_offset,
        "sample_bytes": sample_bytes,
        "data_offset": data.offset,
        "data_bytes": data.size,
        "json_offset": meta.offset,
        "json_bytes": meta.size,
        "mask_offset": mask.offset,
        "mask_bytes": mask.size,
        "mask_length": mask_length,
        "payload_crc32": payload_crc32(payloads[data_suffix], payloads[JSON_SUFFIX], payloads[MASK_SUFFIX]),
        **extra,
    }


def index_bytes(rows: list[dict], schema: pa.Schema, footer: dict[bytes, bytes]) -> bytes:
    """The Parquet index of one shard, with the shard's checksum and build facts in its footer."""
    columns = {field.name: [row[field.name] for row in rows] for field in schema}
    table = pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata(footer)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """A small Parquet file (index, manifest, rejects) read whole, or only `columns` of it (those
    it has). Through ParquetFile, a third of read_table's cost per small file (no dataset layer).

    Single-threaded on purpose: pyarrow 26's CPU thread pool can abort the interpreter at exit
    ("terminate called without an active exception") after a threaded read.
    """
    parquet = pq.ParquetFile(pa.BufferReader(fs.cat_file(path)))
    if columns is not None:
        columns = [name for name in columns if name in parquet.schema_arrow.names]
    return parquet.read(columns=columns, use_threads=False)


def check_rows(path: str, table: pa.Table, rows: int) -> pa.Table:
    """`table`, read from `path`, if it has the rows dataset.json records; else an error naming it."""
    if table.num_rows != rows:
        raise ValueError(f"{path} has {table.num_rows} rows but dataset.json says {rows}")
    return table


def read_index_column(fs, root: str, indexes: list[tuple[str, int]], name: str, *, threads: int = 16,
                      default: int | None = None) -> list[pa.Array]:
    """Column `name` of every index file (path under `root`, rows dataset.json records), read in
    parallel threads, in the given order; an index without the column gives `default` per row
    (None: an error). A file whose row count differs from dataset.json's is an error naming it."""
    from concurrent.futures import ThreadPoolExecutor

    def piece(item: tuple[str, int]) -> pa.Array:
        path, rows = item
        table = check_rows(path, read_parquet(fs, f"{root.rstrip('/')}/{path}", [name]), rows)
        if name in table.column_names:
            return table.column(name).combine_chunks()
        if default is None:
            raise ValueError(f"{path} has no column {name!r}")
        return pa.array(np.full(rows, default, dtype=np.int64))

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(indexes)))) as pool:
        return list(pool.map(piece, indexes))


class PlanFileError(ValueError):
    """A split's plan file disagrees with dataset.json (the message says how, not where)."""


def read_plan_column(fs, root: str, summary, name: str) -> pa.Array:
    """Column `name` of a split's plan file (`summary`: its SplitSummary), checked against the sha256
    and sample count dataset.json records; FileNotFoundError where the file is missing."""
    data = fs.cat_file(f"{root.rstrip('/')}/{summary.plan}")
    if sha256_hex(data) != summary.plan_sha256:
        raise PlanFileError("sha256 differs from dataset.json")
    table = pq.read_table(pa.BufferReader(data), use_threads=False)
    if table.num_rows != summary.samples:
        raise PlanFileError(f"{table.num_rows} rows, dataset.json says {summary.samples} samples")
    return table.column(name).combine_chunks()


def plan_column_bytes(values: list[pa.Array], name: str) -> bytes:
    """A split's plan file: the one column its epochs are planned from, every sample in shard order."""
    table = pa.table({name: pa.concat_arrays(values) if values else pa.array([], type=pa.int64())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_index_footer(fs, path: str) -> dict[bytes, bytes]:
    return dict(pq.read_schema(pa.BufferReader(fs.cat_file(path))).metadata or {})
