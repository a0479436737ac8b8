"""Libri-light: recordings of minutes cut into pieces at the JSON's voice activity, or at silences
found by the energy detector where the JSON is missing or broken; bounded memory; resumable."""
from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librilight import LibriLightSource, _list_recordings, _scan_recording, pieces
from pipelines.storage import Location
from schemas import FrameGrid
from tests.helpers import run_d2v, tar_members

RATE = 16000
BURST, PAUSE = 8.0, 1.0  # seconds of voice, seconds of silence between


def _recording(path: Path, bursts: list[float], *, rate: int = RATE, seed: int = 0) -> list[tuple[float, float]]:
    """Voice-like bursts separated by PAUSE seconds of faint noise; returns the voiced stretches."""
    rng = np.random.default_rng(seed)
    parts, stretches, t = [np.zeros(int(0.5 * rate), np.float32)], [], 0.5
    for seconds in bursts:
        n = int(seconds * rate)
        tone = np.sin(2 * np.pi * rng.uniform(120, 300) * np.arange(n) / rate) * 0.3
        parts.append((tone * (1 + 0.3 * rng.standard_normal(n))).astype(np.float32))
        stretches.append((t, t + seconds))
        t += seconds
        parts.append((rng.standard_normal(int(PAUSE * rate)) * 1e-4).astype(np.float32))
        t += PAUSE
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.concatenate(parts), rate, format="FLAC", subtype="PCM_16")
    return stretches


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("librilight") / "small"
    vad = _recording(root / "100" / "book_a" / "chapter_01.flac", [BURST] * 20, seed=1)  # 3 minutes, JSON
    (root / "100" / "book_a" / "chapter_01.json").write_text(json.dumps({"speaker": "100", "snr": 10.0,
                                                                         "voice_activity": vad}))
    _recording(root / "100" / "book_a" / "chapter_02.flac", [BURST] * 12, seed=2)  # no JSON
    _recording(root / "200" / "book.b" / "ch-3.flac", [BURST] * 6 + [40.0], seed=3)  # broken JSON, a long stretch
    (root / "200" / "book.b" / "ch-3.json").write_text("{voice_activity: [[0, ")
    (root / "200" / "book.b" / "empty.flac").write_bytes(b"")
    return root


def test_pieces_join_stretches_up_to_the_limit_and_cut_in_silences():
    stretches = [(0.5 + 9 * i, 8.5 + 9 * i) for i in range(20)]
    found = pieces(stretches, 30.0, 200.0)
    assert len(found) == 7 and all(end - start <= 30.0 for start, end in found)
    assert [round(end - start, 3) for start, end in found] == [26.0] * 6 + [17.0]
    assert pieces([(0.0, 40.0)], 30.0, 40.0) == [(0.0, 20.0), (20.0, 40.0)]  # a long stretch: equal parts
    assert pieces([(1.0, 5.0)], 30.0, 3.0) == [(1.0, 3.0)]  # clipped to the recording


def test_a_librilight_build_segments_every_recording_as_expected(corpus, tmp_path):
    out = tmp_path / "out"
    run_d2v("data", "build", "librilight", str(corpus), str(out), "--max-seconds", "30", "--shard-size", "8",
            "--mask-variants", "1", "--workers", "0")
    info = json.loads((out / "dataset.json").read_text())
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    by_file: dict[str, list[dict]] = {}
    for row in manifest:
        by_file.setdefault(row["path"], []).append(row)
    # 20 bursts from the JSON: 7 pieces; 12 bursts from the energy detector: 4 pieces of 3 bursts;
    # 6 bursts + a 40 s stretch (broken JSON): 2 pieces of 3 bursts, the long one in halves
    assert {p: len(rows) for p, rows in by_file.items()} == {"100/book_a/chapter_01.flac": 7,
                                                             "100/book_a/chapter_02.flac": 4,
                                                             "200/book.b/ch-3.flac": 4}
    assert info["counts"] == {"recordings": 3, "pieces": 15, "vad_from_energy": 2, "broken_vad_json": 1,
                              "untranscribed": 15}
    assert info["rejects_by_reason"] == {"empty_audio": 1} and info["samples"] == 15
    assert info["source_items"] == info["samples"] + info["rejected"]
    for rows in by_file.values():
        for row in rows:
            seconds = (row["stop"] - row["start"]) / RATE
            assert 15.0 <= seconds <= 30.0
    energy = sorted(by_file["100/book_a/chapter_02.flac"], key=lambda r: r["start"])
    for row, burst in zip(energy, range(0, 12, 3)):  # the detector finds the bursts to a frame (30 ms)
        assert abs(row["start"] / RATE - (0.5 + 9 * burst)) <= 0.031
        assert abs(row["stop"] / RATE - (0.5 + 9 * burst + 26.0)) <= 0.031
    keys = sorted(r["id"] for r in manifest)
    assert keys[0] == "100-book_a-chapter_01-0000" and "200-book_b-ch_3-0003" in keys
    # the stored pieces are the recording's samples, cut where the manifest says
    original, _ = soundfile.read(corpus / "100" / "book_a" / "chapter_01.flac", dtype="int16")
    stored = {}
    for shard in info["shards"]:
        members = tar_members(out / shard["name"])
        stored.update({k[:-5]: v for k, v in members.items() if k.endswith(".flac")})
    for row in by_file["100/book_a/chapter_01.flac"]:
        audio, rate = soundfile.read(io.BytesIO(stored[row["id"]]), dtype="int16")
        assert rate == RATE and np.array_equal(audio, original[row["start"]: row["stop"]])
    # rebuilt from scratch on a local Dask cluster: byte-identical
    again = tmp_path / "again"
    run_d2v("data", "build", "librilight", str(corpus), str(again), "--max-seconds", "30", "--shard-size", "8",
            "--mask-variants", "1", "--workers", "2")
    assert json.loads((again / "dataset.json").read_text())["shards"] == info["shards"]


def test_a_long_recording_is_read_in_bounded_memory(tmp_path):
    """Scanning and building a 10-minute recording stay far below its decoded size (38 MB as
    float32; an hour: 230 MB): the scan decodes 10 s blocks, the build one piece (<= 30 s) at a time,
    so the peak depends on --max-seconds, not on the recording's length."""
    root = tmp_path / "ll"
    _recording(root / "1" / "b" / "long.flac", [BURST] * 66, seed=4)  # 10 minutes
    (recording,) = _list_recordings(*Location(str(root)).filesystem())
    source = LibriLightSource(Location(str(root)))
    tracemalloc.start()
    try:
        rows, rejects, counts = _scan_recording(recording, Location(str(root)), "train", 30.0, FrameGrid())
        _, scan_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fs, base = Location(str(root)).filesystem()
        for row in rows:
            assert not hasattr(source.encode(fs, base, row), "reason")
        _, build_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    decoded = 600 * RATE * 4
    assert len(rows) == 22 and not rejects and counts["vad_from_energy"] == 1
    piece = 30 * RATE * 4  # one longest piece as float32
    assert scan_peak < decoded / 8 and build_peak < 5 * piece < decoded / 3, (scan_peak, build_peak)


def test_a_killed_librilight_build_resumes_to_the_same_shards(corpus, tmp_path):
    options = BuildOptions(ShardSize.parse("4"), 1, 0)
    reference = build_dataset(LibriLightSource(Location(str(corpus))), Location(str(tmp_path / "ref")), options,
                              workers=0, echo=lambda *_: None)
    out = tmp_path / "out"
    build_dataset(LibriLightSource(Location(str(corpus))), Location(str(out)), options, workers=0,
                  echo=lambda *_: None)
    (out / "dataset.json").unlink()  # as if killed before the commit, one shard never written
    (out / reference.shards[1].index).unlink()
    lines = []
    resumed = build_dataset(LibriLightSource(Location(str(corpus))), Location(str(out)), options, workers=0,
                            echo=lines.append)
    assert f"({len(reference.shards) - 1} already done)" in lines[-1]
    assert resumed.shards == reference.shards


@pytest.mark.s3
def test_librilight_on_s3_gives_the_shards_of_the_local_disk(corpus, tmp_path, s3_server, s3_bucket):
    fs = s3_server.filesystem()
    for path in corpus.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{s3_bucket}/ll/{path.relative_to(corpus)}", path.read_bytes())
    options = BuildOptions(ShardSize.parse("8"), 1, 0)
    local = build_dataset(LibriLightSource(Location(str(corpus))), Location(str(tmp_path / "local")), options,
                          workers=0, echo=lambda *_: None)
    remote = build_dataset(LibriLightSource(Location(f"s3://{s3_bucket}/ll", s3_server.storage_options())),
                           Location(f"s3://{s3_bucket}/out", s3_server.storage_options()), options, workers=0,
                           echo=lambda *_: None)
    assert remote.shards == local.shards and remote.counts == local.counts
