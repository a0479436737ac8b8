"""Damaged shards and indexes, fuzzed (seeded, a bounded number of cases; D2V_FUZZ_CASES=500
`pytest -m fuzz` for more): the reader and `d2v data verify` name the damaged shard, and never hang,
crash or hand out a wrong sample."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d2v_train.data.index import SplitIndex
from d2v_train.data.reader import SampleRequest, ShardError, ShardReader
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.inspection import verify
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from schemas.arrow import SPAN_COLUMNS
from tests.helpers import read_dataset_json

CASES = int(os.environ.get("D2V_FUZZ_CASES", "24"))
SPLIT = "train-clean-100"
REQUEST_COLUMNS = (*SPAN_COLUMNS, "payload_crc32")
KINDS = ("flip_tar", "truncate_tar", "flip_index", "shift_offsets", "change_sizes", "swap_keys", "drop_rows")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    spec = synthetic.make_librispeech(str(root / "corpus"), {SPLIT: 8}, seed=6, seconds=(1.0, 1.6))
    build_dataset(LibriSpeechSource(Location(spec.source), (SPLIT,)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("3"), 2, 0), workers=0, echo=lambda *_: None)
    return root / "data"


def _samples(folder: Path, info: dict) -> dict[str, dict | Exception]:
    """Each shard's samples as the loader's parts give them (its index files read through
    SplitIndex, the bytes through ShardReader): {shard: {key: SampleBytes}, or the error}."""
    index = SplitIndex.load(Location(str(folder)), SPLIT)
    shard_of = index.columns["shard"]
    out: dict[str, dict | Exception] = {}
    shards = [(s.name, s.sha256, s.bytes) for s in index.shards]
    with ShardReader(Location(str(folder)), shards, data_suffix="flac", threads=1, retries=0, timeout_s=30) as reader:
        for number, shard in enumerate(index.shards):
            try:
                rows = np.flatnonzero(shard_of == number)
                fields = index.gather(rows, ("shard", "key", *REQUEST_COLUMNS))
                requests = [SampleRequest(*values) for values in zip(*fields)]
                out[shard.name] = {r.key: s for r, s in zip(requests, reader.read(requests))}
            except (ShardError, ValueError) as exc:  # the errors that name what is damaged
                out[shard.name] = exc
    return out


def _damage(folder: Path, info: dict, rng: np.random.Generator) -> tuple[str, str]:
    """One random damage to one shard's tar or index: (shard name, kind)."""
    shard = info["shards"][int(rng.integers(len(info["shards"])))]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    tar, index = folder / shard["name"], folder / shard["index"]
    if kind in ("flip_tar", "flip_index"):
        path = tar if kind == "flip_tar" else index
        data = bytearray(path.read_bytes())
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[int(at)] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
    elif kind == "truncate_tar":
        data = tar.read_bytes()
        tar.write_bytes(data[: int(rng.integers(0, len(data)))])
    else:
        table = pq.read_table(index)
        rows = table.to_pylist()
        if kind == "shift_offsets":
            column = ["data_offset", "json_offset", "mask_offset", "sample_offset"][int(rng.integers(4))]
            row = rows[int(rng.integers(len(rows)))]
            row[column] = max(0, row[column] + int(rng.choice([-512, -1, 1, 7, 512, 10**6])))
        elif kind == "change_sizes":
            column = ["data_bytes", "json_bytes", "mask_bytes", "sample_bytes"][int(rng.integers(4))]
            row = rows[int(rng.integers(len(rows)))]
            row[column] = max(0, row[column] + int(rng.choice([-100, -1, 1, 100])))
        elif kind == "swap_keys" and len(rows) > 1:
            a, b = rng.choice(len(rows), size=2, replace=False)
            rows[a]["key"], rows[b]["key"] = rows[b]["key"], rows[a]["key"]
        else:
            rows = rows[:-1]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), index)
    return shard["name"], kind


def _check_case(clean: Path, tmp: Path, seed: int, reference: dict) -> str:
    folder = tmp / f"case-{seed}"
    shutil.copytree(clean, folder)
    info = read_dataset_json(folder)
    name, kind = _damage(folder, info, np.random.default_rng(seed))
    # verify: only the damaged shard is reported (or nothing, where the damage changed nothing read)
    report = verify(Location(str(folder)))
    named = [shard for shard, _ in report.broken]
    assert all(n == name for n in named), (seed, kind, report.broken)
    # the loader's reading: every sample handed out is the clean one, or the damage is an error
    # naming the shard (or its index file), or the sample is flagged as damaged
    found = _samples(folder, info)
    index_of = {s["name"]: s["index"] for s in info["shards"]}
    silent = []
    for shard, samples in found.items():
        if isinstance(samples, Exception):
            assert shard == name and (name in str(samples) or index_of[name] in str(samples)), (seed, kind, samples)
            continue
        for key, sample in samples.items():
            if sample is None or sample.damage:
                assert shard == name, (seed, kind, key)
                continue
            clean_sample = reference[shard].get(key)
            if clean_sample is None or (sample.data, sample.json, sample.mask) != (
                    clean_sample.data, clean_sample.json, clean_sample.mask):
                silent.append((shard, key))
    assert not silent, f"case {seed} ({kind} of {name}): wrong samples handed out silently: {silent}"
    if not named:  # verify found nothing: then nothing read changed
        assert all(not isinstance(v, Exception) for v in found.values()), (seed, kind, found)
    return kind


def _run_cases(clean: Path, tmp: Path, cases: int) -> set[str]:
    reference = _samples(clean, read_dataset_json(clean))
    assert all(isinstance(v, dict) for v in reference.values())
    return {_check_case(clean, tmp, seed, reference) for seed in range(cases)}


@pytest.mark.timeout(300)
def test_fuzzed_damage_is_named_never_served(clean, tmp_path):
    kinds = _run_cases(clean, tmp_path, CASES)
    assert len(kinds) >= 5, kinds  # the cases cover most kinds of damage


@pytest.mark.fuzz
@pytest.mark.timeout(3600)
def test_many_more_fuzzed_cases(clean, tmp_path):
    """Deselected by default (pytest.ini's -m 'not fuzz'); `pytest -m fuzz` runs 20x D2V_FUZZ_CASES."""
    _run_cases(clean, tmp_path, CASES * 20)
