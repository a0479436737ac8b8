"""LibriSpeech shards: counts add up, faults are rejected with reasons, bytes are deterministic."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import webdataset as wds

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import SAMPLE_OVERHEAD_BYTES, ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from schemas import FrameGrid
from tests.helpers import inspect_json, load_npy, read_dataset_json, run_d2v, tar_members

SUBSETS = ("train-clean-100", "dev-clean")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("librispeech")
    return synthetic.make_librispeech(str(root), {"train-clean-100": 14, "dev-clean": 5}, seed=3, faults=True)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("speech-out")
    dataset = build_dataset(
        LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(out)),
        BuildOptions(ShardSize.parse("4"), mask_variants=3, seed=7), workers=0, echo=lambda *_: None,
    )
    return out, dataset


def test_counts_add_up_and_every_fault_has_its_reason(corpus, built):
    out, dataset = built
    expected = corpus.expected
    assert dataset.source_items == expected["items"] == dataset.samples + dataset.rejected
    assert dataset.samples == expected["accepted"]
    assert dataset.rejects_by_reason == expected["rejects_by_reason"]
    assert dataset.counts["untranscribed"] == expected["untranscribed"]
    assert {k: dataset.counts.get(k, 0) for k in ("resampled", "downmixed")} == expected["converted"]
    assert {name: s.samples for name, s in dataset.splits.items()} == expected["splits"]
    rejects = pq.read_table(out / "rejects.parquet", use_threads=False).to_pylist()
    assert len(rejects) == dataset.rejected
    for row in rejects:
        assert row["detail"] and row["reason"] and row["stage"] in ("scan", "build")
        if row["reason"] != "missing_audio":
            assert row["path"].endswith(".flac") and row["path"].split("/")[-1][:-5] in row["detail"]
    by_path = {r["path"].split("/", 1)[1]: r["reason"] for r in rejects if r["reason"] != "missing_audio"}
    for path, reason in corpus.faults.items():
        if reason not in (*synthetic.ACCEPTED_FAULTS, "missing_audio"):
            assert by_path[path.split("/", 1)[1]] == reason


def test_inspect_json_reports_counts_splits_and_seconds(built):
    out, dataset = built
    info = inspect_json(str(out))
    assert info["source_items"] == info["samples"] + info["rejected"]
    assert sum(info["rejects_by_reason"].values()) == info["rejected"]
    assert set(info["splits"]) == set(SUBSETS)
    for name, split in info["splits"].items():
        assert split["samples"] == dataset.splits[name].samples
        assert split["shards"] >= 1 and split["bytes"] > 0 and split["seconds"] > 0


def test_samples_are_the_original_flac_with_masks_on_the_frame_grid(corpus, built):
    out, dataset = built
    grid = FrameGrid()
    source_root = Path(corpus.source)
    seen = 0
    for shard in dataset.shards:
        members = tar_members(out / shard.name)
        index = pq.read_table(out / shard.index, use_threads=False).to_pylist()
        tar_bytes = (out / shard.name).read_bytes()
        for row in index:
            key = row["key"]
            speaker, chapter, _ = key.split("-")
            source_file = source_root / shard.split / speaker / chapter / f"{key}.flac"
            original = source_file.read_bytes()
            stored = members[f"{key}.flac"]
            assert tar_bytes[row["data_offset"]: row["data_offset"] + row["data_bytes"]] == stored
            audio, rate = soundfile.read(io.BytesIO(stored), always_2d=True)
            assert rate == 16000 and audio.shape[1] == 1 and row["num_samples"] == len(audio)
            meta = json.loads(members[f"{key}.json"])
            fault = corpus.faults.get(str(source_file.relative_to(source_root)))
            if fault in ("resampled", "downmixed"):  # 8 kHz or stereo: converted, the duration kept
                info = soundfile.info(source_file)
                assert (meta["source_rate"], meta["source_channels"]) == (info.samplerate, info.channels)
                assert abs(len(audio) / 16000 - info.duration) < 1 / 16000 * 2
            else:  # 16 kHz mono FLAC: the file's own bytes
                assert stored == original and "source_rate" not in meta
            mask = load_npy(members[f"{key}.mask.npy"])
            assert mask.dtype == np.bool_ and mask.shape == (3, grid.frames(len(audio))) == (3, row["mask_length"])
            assert 0.3 < mask.mean() < 0.7  # span masks at p=0.65, L=10 cover about half
            assert not all(np.array_equal(mask[0], mask[i]) for i in range(1, 3)), "variants must differ"
            meta = json.loads(members[f"{key}.json"])
            assert meta["key"] == key and meta["split"] == shard.split
            seen += 1
    assert seen == dataset.samples


def test_plain_webdataset_reads_the_shards(built):
    out, dataset = built
    urls = [str(out / s.name) for s in dataset.shards_of("train-clean-100")]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert {"flac", "json", "mask.npy"} <= set(sample)
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == dataset.splits["train-clean-100"].samples


def test_same_input_and_seed_give_byte_identical_shards(corpus, built, tmp_path):
    out, dataset = built
    again = build_dataset(
        LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(tmp_path)),
        BuildOptions(ShardSize.parse("4"), mask_variants=3, seed=7), workers=0, echo=lambda *_: None,
    )
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in dataset.shards]
    for shard in dataset.shards:
        assert (tmp_path / shard.index).read_bytes() == (out / shard.index).read_bytes()
    other = build_dataset(
        LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(tmp_path / "seed8")),
        BuildOptions(ShardSize.parse("4"), mask_variants=3, seed=8), workers=0, echo=lambda *_: None,
    )
    assert [s.sha256 for s in other.shards] != [s.sha256 for s in dataset.shards]


def test_verify_passes_then_names_every_broken_shard(built, tmp_path):
    out, dataset = built
    assert run_d2v("data", "verify", str(out)).returncode == 0
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victims = [dataset.shards[1], dataset.shards[-1]]
    for victim in victims:
        data = bytearray((copy / victim.name).read_bytes())
        data[700] ^= 0xFF
        (copy / victim.name).write_bytes(bytes(data))
    garbled = dataset.shards[0]  # an index pyarrow cannot parse (its error text spans lines)
    index = bytearray((copy / garbled.index).read_bytes())
    index[len(index) // 2: len(index) // 2 + 64] = bytes(64)
    (copy / garbled.index).write_bytes(bytes(index))
    intact = sum(s.samples for s in dataset.shards) - sum(v.samples for v in [*victims, garbled])
    for _ in range(3):  # never an abort at exit, whatever the damage made the readers raise
        result = run_d2v("data", "verify", str(copy), check=False)
        assert result.returncode == 1, result.stderr
        for victim in victims:  # every broken shard, not only the first
            assert f"BROKEN {victim.name}: sha256" in result.stderr
        assert f"BROKEN {garbled.name}: index cannot be read" in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 4 and lines[-1] == (f"3 of {len(dataset.shards)} shards broken; {intact} samples "
                                                 "in the intact ones"), result.stderr


def test_verify_catches_an_index_that_disagrees_with_its_tar(built, tmp_path):
    out, dataset = built
    import shutil

    import pyarrow as pa

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = dataset.shards[0]
    table = pq.read_table(copy / shard.index, use_threads=False)
    offsets = table.column("json_offset").to_pylist()
    offsets[0] += 512
    table = table.set_column(table.schema.get_field_index("json_offset"), "json_offset", pa.array(offsets, pa.int64()))
    pq.write_table(table, copy / shard.index)
    other = dataset.shards[1]  # an index whose payload checksum names other bytes than its tar's
    table = pq.read_table(copy / other.index, use_threads=False)
    crcs = table.column("payload_crc32").to_pylist()
    crcs[-1] ^= 1
    table = table.set_column(table.schema.get_field_index("payload_crc32"), "payload_crc32", pa.array(crcs, pa.int64()))
    pq.write_table(table, copy / other.index)
    key = table.column("key").to_pylist()[-1]
    result = run_d2v("data", "verify", str(copy), check=False)
    assert result.returncode == 1 and f"BROKEN {shard.name}: index offsets" in result.stderr
    assert f"BROKEN {other.name}: payload checksum of {key} differs" in result.stderr


def test_cli_build_matches_the_library_build(corpus, built, tmp_path):
    out, dataset = built
    run_d2v("data", "build", "librispeech", corpus.source, str(tmp_path), "--subsets", ",".join(SUBSETS),
            "--shard-size", "4", "--mask-variants", "3", "--seed", "7", "--workers", "0")
    assert [s["sha256"] for s in read_dataset_json(tmp_path)["shards"]] == [s.sha256 for s in dataset.shards]


def test_byte_sized_shards_respect_the_budget(corpus, tmp_path):
    dataset = build_dataset(
        LibriSpeechSource(Location(corpus.source), ("train-clean-100",)), Location(str(tmp_path)),
        BuildOptions(ShardSize.parse("300KB"), mask_variants=1, seed=0), workers=0, echo=lambda *_: None,
    )
    assert len(dataset.shards) > 1
    manifest = pq.read_table(tmp_path / "manifest.parquet", use_threads=False).to_pylist()
    sizes = {row["id"]: row["bytes"] for row in manifest}
    for shard in dataset.shards:
        keys = pq.read_table(tmp_path / shard.index, use_threads=False).column("key").to_pylist()
        assert len(keys) == 1 or sum(sizes[k] + SAMPLE_OVERHEAD_BYTES for k in keys) <= 300_000
        assert (tmp_path / shard.name).stat().st_size < 300_000 + 20_000 * len(keys)


def test_missing_subset_is_a_clear_error_before_any_output(corpus, tmp_path):
    result = run_d2v("data", "build", "librispeech", corpus.source, str(tmp_path / "out"),
                     "--subsets", "train-clean-360", "--workers", "0", check=False)
    assert result.returncode == 2
    assert "train-clean-360" in result.stderr and "train-clean-100" in result.stderr
    assert not (tmp_path / "out" / "dataset.json").exists()
