"""A speech dataset's metadata at the size of real corpora, without payload: dataset.json, one
Parquet index per shard and the split's plan file, as a build writes them (no tar exists). Enough to time reading the
metadata and planning epochs at 10 million samples; a read of a sample would fail.

Utterance lengths follow LibriSpeech's (1-35 s, most 10-16 s), keys its SPEAKER-CHAPTER-NNNN form;
the output is identical for a given seed.
"""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.shards import plan_column_bytes, sha256_hex
from pipelines.storage import Location, join, write_atomic
from schemas import SCHEMA_VERSION, Dataset, FrameGrid, MaskConfig, ShardInfo, SplitSummary, index_schema
from schemas.dataset import DATASET_JSON

SAMPLE_RATE = 16_000
HOP = 320


def index_table(shard: int, samples: int, seed: int) -> pa.Table:
    """The index of shard `shard`: `samples` rows of plausible speech, spans laid out as a tar's."""
    rng = np.random.default_rng([seed, shard])
    seconds = np.clip(rng.normal(12.5, 4.0, samples), 1.0, 35.0)
    num_samples = (seconds * SAMPLE_RATE).astype(np.int64)
    data_bytes = num_samples // 2  # FLAC at about 8 bits a sample
    frames = (num_samples - 80) // HOP
    mask_bytes = 128 + 4 * frames  # (4 variants, frames) bool .npy
    json_bytes = np.full(samples, 160, dtype=np.int64)
    sample_bytes = 512 * 3 + -(-data_bytes // 512) * 512 + -(-json_bytes // 512) * 512 + -(-mask_bytes // 512) * 512
    sample_offset = np.concatenate([[0], np.cumsum(sample_bytes)[:-1]])
    speaker = 1000 + (shard * 7 + np.arange(samples) // 50) % 2400
    keys = [f"{s}-{shard % 997}-{i:04d}" for s, i in zip(speaker.tolist(), range(samples))]
    columns = {
        "key": keys,
        "sample_offset": sample_offset, "sample_bytes": sample_bytes,
        "data_offset": sample_offset + 512, "data_bytes": data_bytes,
        "json_offset": sample_offset + 1024 + -(-data_bytes // 512) * 512, "json_bytes": json_bytes,
        "mask_offset": sample_offset + 1536 + -(-data_bytes // 512) * 512 + 512, "mask_bytes": mask_bytes,
        "mask_length": frames.astype(np.int32),
        "payload_crc32": rng.integers(0, 2**32, samples),
        "num_samples": num_samples,
        "speaker": [str(s) for s in speaker.tolist()],
        "chapter": [str(shard % 997)] * samples,
        "transcript": [None] * samples,  # pre-training corpora at this size are mostly untranscribed
    }
    return pa.Table.from_pydict(columns, schema=index_schema("speech"))


def make_index_only_dataset(out: str, *, shards: int, samples_per_shard: int, split: str = "train",
                            seed: int = 0, threads: int = 8) -> Dataset:
    """Write dataset.json and `shards` index files of `samples_per_shard` rows under `out` (any
    fsspec URL); returns the dataset it describes."""
    location = Location(out)
    fs, root = location.filesystem()
    fs.makedirs(join(root, "index"), exist_ok=True)
    fs.makedirs(join(root, "plan"), exist_ok=True)

    def write(number: int) -> tuple[ShardInfo, pa.Array]:
        table = index_table(number, samples_per_shard, seed)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        name = f"{split}-{number:06d}"
        write_atomic(fs, join(root, "index", f"{name}.parquet"), buffer.getvalue())
        return ShardInfo(split=split, name=f"shards/{name}.tar", index=f"index/{name}.parquet",
                         samples=table.num_rows, bytes=int(pc.sum(table.column("sample_bytes")).as_py()),
                         sha256=hashlib.sha256(f"{seed}-{number}".encode()).hexdigest(),
                         seconds=round(float(pc.sum(table.column("num_samples")).as_py()) / SAMPLE_RATE, 3)), \
            table.column("num_samples").combine_chunks()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        infos, lengths = zip(*pool.map(write, range(shards)))
    plan = plan_column_bytes(list(lengths), "num_samples")
    write_atomic(fs, join(root, "plan", f"{split}.parquet"), plan)
    total = sum(s.samples for s in infos)
    dataset = Dataset(
        schema_version=SCHEMA_VERSION, modality="speech", source="generated:index-only", build={"seed": seed},
        fingerprint=hashlib.sha256(f"index-only {shards} {samples_per_shard} {seed}".encode()).hexdigest(),
        mask=MaskConfig(kind="span", variants=4, seed=seed, params={"mask_prob": 0.65, "mask_length": 10}),
        frame_grid=FrameGrid(), source_items=total, samples=total, rejected=0, rejects_by_reason={},
        splits={split: SplitSummary(samples=total, shards=len(infos), bytes=sum(s.bytes for s in infos),
                                    seconds=round(sum(s.seconds for s in infos), 3),
                                    plan=f"plan/{split}.parquet", plan_sha256=sha256_hex(plan))},
        shards=list(infos))
    write_atomic(fs, join(root, DATASET_JSON), dataset.to_json().encode())
    return dataset
