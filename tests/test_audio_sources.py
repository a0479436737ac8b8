"""Speech in any format and rate, fairseq manifests in and out, and manifest tables (CSV, TSV,
Parquet, JSON lines; local and on the S3 server): converted at build time, rejects with reasons."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.audio import prepare_audio
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.sources.registry import make_source
from pipelines.storage import Location
from schemas import FrameGrid
from tests.helpers import read_dataset_json, run_d2v, tar_members

OPTIONS = BuildOptions(ShardSize.parse("4"), 1, 0)
# (format, subtype, rate, channels): what users' corpora hold
FORMATS = [("WAV", "PCM_16", 8000, 1), ("OGG", "VORBIS", 22050, 2), ("MP3", "MPEG_LAYER_III", 44100, 2),
           ("WAV", "FLOAT", 48000, 2), ("OGG", "OPUS", 48000, 1), ("FLAC", "PCM_24", 16000, 1)]
SUFFIX = {"WAV": "wav", "OGG": "ogg", "MP3": "mp3", "FLAC": "flac"}


def _tone(rate: int, seconds: float, channels: int) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.2 * np.sin(2 * np.pi * 3 * t))
    return np.stack([mono] * channels, axis=1).astype(np.float32)


def _write(path: Path, fmt: str, subtype: str, rate: int, channels: int, seconds: float) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = _tone(rate, seconds, channels)
    soundfile.write(path, audio, rate, format=fmt, subtype=subtype)
    return len(audio)


def _build(source, out: Path, **kwargs):
    return build_dataset(source, Location(str(out)), OPTIONS, workers=0, echo=lambda *_: None, **kwargs)


@pytest.mark.parametrize("fmt, subtype, rate, channels", FORMATS)
def test_any_format_and_rate_becomes_16k_mono_flac_of_the_same_duration(tmp_path, fmt, subtype, rate, channels):
    path = tmp_path / f"a.{SUFFIX[fmt]}"
    frames = _write(path, fmt, subtype, rate, channels, 1.37)
    prepared = prepare_audio(path.read_bytes(), path.name, expected_frames=frames)
    audio, stored_rate = soundfile.read(io.BytesIO(prepared.data), always_2d=True)
    info = soundfile.info(io.BytesIO(prepared.data))
    assert (stored_rate, audio.shape[1], info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
    assert (prepared.rate, prepared.channels) == (rate, channels) and len(audio) == prepared.frames
    assert abs(len(audio) / 16000 - 1.37) < 0.5 / 16000 + 1 / rate  # the duration, to a sample
    grid = FrameGrid()
    assert grid.frames(len(audio)) == grid.frames(round(1.37 * 16000))  # the same frames on the model's grid
    expected = {"resampled"} if rate != 16000 else set()
    expected |= {"downmixed"} if channels > 1 else set()
    assert set(prepared.conversions) - {"transcoded"} == expected and "transcoded" in prepared.conversions
    # the tone survives: its energy sits at 440 Hz
    spectrum = np.abs(np.fft.rfft(audio[:, 0]))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5


def test_undecodable_and_truncated_files_are_rejected_not_converted(tmp_path):
    from pipelines.sources.audio import AudioError

    with pytest.raises(AudioError, match="cannot be decoded") as bad:
        prepare_audio(b"RIFF\x00\x00not audio at all", "x.wav")
    assert bad.value.reason == "truncated_audio"
    with pytest.raises(AudioError, match="is empty") as empty:
        prepare_audio(b"", "x.wav")
    assert empty.value.reason == "empty_audio"
    path = tmp_path / "short.wav"
    frames = _write(path, "WAV", "PCM_16", 22050, 1, 1.0)
    with pytest.raises(AudioError, match="header says"):
        prepare_audio(path.read_bytes()[: len(path.read_bytes()) // 2], "short.wav", expected_frames=frames)


def _formats_corpus(root: Path) -> list[dict]:
    """Files of every format under audio/, described as table rows."""
    rows = []
    for n, (fmt, subtype, rate, channels) in enumerate(FORMATS):
        relative = f"audio/{fmt.lower()}-{n}.{SUFFIX[fmt]}"
        _write(root / relative, fmt, subtype, rate, channels, 1.0 + 0.25 * n)
        rows.append({"path": relative, "sentence": f"HELLO NUMBER {n}", "client": f"spk{n % 2}",
                     "split": "train" if n < 4 else "dev", "seconds": 1.0 + 0.25 * n})
    return rows


def test_fairseq_manifests_round_trip_with_the_same_rows(tmp_path):
    spec = synthetic.make_librispeech(str(tmp_path / "corpus"), {"train-clean-100": 7, "dev-clean": 3}, seed=2,
                                      seconds=(1.0, 2.0), faults=True)
    first = _build(LibriSpeechSource(Location(spec.source), ("train-clean-100", "dev-clean")), tmp_path / "d2v")
    run_d2v("data", "export-manifest", str(tmp_path / "d2v"), str(tmp_path / "fairseq"))
    tsv = (tmp_path / "fairseq" / "dev-clean.tsv").read_text().splitlines()
    assert tsv[0] == str(tmp_path / "fairseq" / "audio") and len(tsv) == 4
    wrd = (tmp_path / "fairseq" / "dev-clean.wrd").read_text().splitlines()
    ltr = (tmp_path / "fairseq" / "dev-clean.ltr").read_text().splitlines()
    assert ltr[0] == " ".join(" ".join(w) + " |" for w in wrd[0].split())  # fairseq's letter targets
    run_d2v("data", "build", "fairseq-manifest", str(tmp_path / "fairseq"), str(tmp_path / "back"),
            "--shard-size", "4", "--mask-variants", "1", "--workers", "0")
    back = read_dataset_json(tmp_path / "back")
    assert back["samples"] == first.samples and back["rejected"] == 0
    assert {k: v["samples"] for k, v in back["splits"].items()} == {k: v.samples for k, v in first.splits.items()}

    def rows(folder):
        found = {}
        info = read_dataset_json(folder)
        for shard in info["shards"]:
            members = tar_members(folder / shard["name"])
            for row in pq.read_table(folder / shard["index"]).to_pylist():
                found[row["key"]] = (shard["split"], row["num_samples"], row["transcript"], members[f"{row['key']}.flac"])
        return found

    assert rows(tmp_path / "back") == rows(tmp_path / "d2v")  # keys, splits, lengths, transcripts, audio bytes


def test_a_fairseq_manifest_with_bad_lines_and_wrong_lengths(tmp_path):
    folder = tmp_path / "manifest"
    frames = _write(folder / "wavs" / "a.wav", "WAV", "PCM_16", 16000, 1, 1.0)
    _write(folder / "wavs" / "b.wav", "WAV", "PCM_16", 16000, 1, 1.0)
    (folder / "train.tsv").write_text(f"wavs\na.wav\t{frames}\nb.wav\t123\nnot a row\nc.wav\t16000\n")
    (folder / "train.wrd").write_text("HELLO\nTHERE\nX\nY\n")
    dataset = _build(make_source("fairseq-manifest", [Location(str(folder))]), tmp_path / "out")
    assert dataset.samples == 1 and dataset.source_items == 4
    assert dataset.rejects_by_reason == {"bad_row": 1, "length_mismatch": 1, "missing_audio": 1}
    (folder / "train.wrd").write_text("HELLO\n")
    with pytest.raises(ValueError, match="train.wrd has 1 lines, train.tsv has 4 rows"):
        _build(make_source("fairseq-manifest", [Location(str(folder))]), tmp_path / "out2")


def _write_table(path: Path, rows: list[dict], kind: str) -> None:
    import polars as pl

    frame = pl.DataFrame(rows)
    if kind == "csv":
        frame.write_csv(path)
    elif kind == "tsv":
        frame.write_csv(path, separator="\t", quote_style="never")
    elif kind == "parquet":
        frame.write_parquet(path)
    else:
        frame.write_ndjson(path)


@pytest.mark.parametrize("kind", ["tsv", "csv", "parquet", "jsonl"])
def test_speech_tables_with_missing_files_bad_rows_and_broken_text(tmp_path, kind):
    rows = _formats_corpus(tmp_path)
    rows.append({"path": "audio/gone.wav", "sentence": "MISSING", "client": "x", "split": "train", "seconds": 1.0})
    rows.append({"path": "", "sentence": "NO PATH", "client": "x", "split": "train", "seconds": 1.0})
    table = tmp_path / f"corpus.{kind}"
    _write_table(table, rows, kind)
    if kind == "tsv":  # a transcript in Latin-1 among UTF-8 ones: that row alone is refused
        _write(tmp_path / "audio" / "latin.wav", "WAV", "PCM_16", 16000, 1, 1.0)
        with open(table, "ab") as f:
            f.write("audio/latin.wav\tCAF\u00c9 ET CR\u00c8ME\tspk9\ttrain\t1.0\n".encode("latin-1"))
    run_d2v("data", "build", "manifest", str(table), str(tmp_path / "out"), "--modality", "speech",
            "--transcript-column", "sentence", "--speaker-column", "client", "--split-column", "split",
            "--shard-size", "4", "--mask-variants", "1", "--workers", "0")
    info = read_dataset_json(tmp_path / "out")
    expected = {"missing_audio": 1, "bad_row": 1, **({"bad_transcript": 1} if kind == "tsv" else {})}
    assert info["rejects_by_reason"] == expected
    assert info["samples"] == len(FORMATS) and info["source_items"] == info["samples"] + info["rejected"]
    assert {k: v["samples"] for k, v in info["splits"].items()} == {"train": 4, "dev": 2}
    assert info["counts"]["resampled"] == 5 and info["counts"]["downmixed"] == 3
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert sorted((r["sample_rate"], r["channels"]) for r in manifest) == sorted((f[2], f[3]) for f in FORMATS)
    seconds = {Path(r["path"]).stem: r["seconds"] for r in rows if r["path"]}
    for shard in info["shards"]:
        members = tar_members(tmp_path / "out" / shard["name"])
        for row in pq.read_table(tmp_path / "out" / shard["index"]).to_pylist():
            audio, rate = soundfile.read(io.BytesIO(members[f"{row['key']}.flac"]))
            assert rate == 16000 and abs(len(audio) / 16000 - seconds[row["key"]]) < 1e-3
            assert row["transcript"].startswith("HELLO NUMBER") and row["speaker"].startswith("spk")


def test_image_tables_label_by_class_name(tmp_path):
    from PIL import Image

    rows = []
    for n in range(6):
        relative = f"pics/{n}.{'png' if n % 2 else 'jpg'}"
        (tmp_path / "pics").mkdir(exist_ok=True)
        Image.new("RGB", (40 + n, 30), (40 * n, 10, 200)).save(tmp_path / relative)
        rows.append({"file": relative, "label": ["cat", "dog", None][n % 3]})
    rows.append({"file": "pics/missing.jpg", "label": "cat"})
    rows.append({"file": "notes.txt", "label": "dog"})
    _write_table(tmp_path / "labels.csv", rows, "csv")
    run_d2v("data", "build", "manifest", str(tmp_path / "labels.csv"), str(tmp_path / "out"), "--modality", "vision",
            "--path-column", "file", "--label-column", "label", "--shard-size", "4", "--mask-variants", "1",
            "--workers", "0", "--image-size", "32", "--patch-size", "16")
    info = read_dataset_json(tmp_path / "out")
    assert info["classes"] == ["cat", "dog"] and info["samples"] == 6
    assert info["rejects_by_reason"] == {"not_an_image": 1, "unreadable_file": 1}
    labels = {r["key"]: r["label"] for s in info["shards"] for r in pq.read_table(tmp_path / "out" / s["index"]).to_pylist()}
    assert labels == {"0": 0, "1": 1, "2": -1, "3": 0, "4": 1, "5": -1}


def test_a_wrong_column_is_named(tmp_path):
    _write_table(tmp_path / "t.csv", [{"path": "a.wav"}], "csv")
    result = run_d2v("data", "build", "manifest", str(tmp_path / "t.csv"), str(tmp_path / "out"), "--modality",
                     "speech", "--transcript-column", "text", check=False)
    assert result.returncode != 0 and "t.csv has no column --transcript-column text (its columns: path)" in result.stderr


@pytest.mark.s3
def test_a_table_on_s3_naming_files_on_s3_builds_the_same_shards_as_on_disk(tmp_path, s3_server, s3_bucket):
    rows = _formats_corpus(tmp_path)
    fs = s3_server.filesystem()
    for row in rows:
        fs.pipe_file(f"{s3_bucket}/corpus/{row['path']}", (tmp_path / row["path"]).read_bytes())
    # relative paths on S3, and one row naming its file by URL
    remote_rows = [dict(r) for r in rows]
    remote_rows[0]["path"] = f"s3://{s3_bucket}/corpus/{rows[0]['path']}"
    local_rows = [dict(r) for r in rows]
    local_rows[0]["path"] = str(tmp_path / rows[0]["path"])
    _write_table(tmp_path / "local.parquet", local_rows, "parquet")
    _write_table(tmp_path / "remote.parquet", remote_rows, "parquet")
    fs.pipe_file(f"{s3_bucket}/corpus/remote.parquet", (tmp_path / "remote.parquet").read_bytes())
    options = json.dumps(s3_server.storage_options())
    common = ["--modality", "speech", "--transcript-column", "sentence", "--split-column", "split",
              "--shard-size", "4", "--mask-variants", "1", "--workers", "0"]
    run_d2v("data", "build", "manifest", str(tmp_path / "local.parquet"), str(tmp_path / "local"), *common)
    run_d2v("data", "build", "manifest", f"s3://{s3_bucket}/corpus/remote.parquet", f"s3://{s3_bucket}/out",
            *common, "--storage-options", options, env=s3_server.env())
    local = read_dataset_json(tmp_path / "local")
    remote = json.loads(fs.cat_file(f"{s3_bucket}/out/dataset.json"))
    assert remote["samples"] == local["samples"] == len(FORMATS)
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]


def test_a_text_table_builds_its_files_and_rejects_its_bad_rows(tmp_path):
    from pipelines.synthetic import make_text_corpus

    spec = make_text_corpus(str(tmp_path / "corpus"), files=3, docs_per_file=4, seed=5)
    files = sorted(Path(spec.source).glob("*.txt"))
    rows = [{"path": str(f.relative_to(tmp_path))} for f in files] + [{"path": "corpus/gone.txt"}, {"path": ""}]
    _write_table(tmp_path / "files.jsonl", rows, "jsonl")
    run_d2v("data", "build", "manifest", str(tmp_path / "files.jsonl"), str(tmp_path / "out"), "--modality", "text",
            "--vocab-size", "300", "--block-size", "64", "--shard-size", "50", "--mask-variants", "1", "--workers", "0")
    info = read_dataset_json(tmp_path / "out")
    direct = tmp_path / "direct"
    run_d2v("data", "build", "text", *map(str, files), str(direct), "--vocab-size", "300", "--block-size", "64",
            "--shard-size", "50", "--mask-variants", "1", "--workers", "0")
    alone = read_dataset_json(direct)
    assert info["rejects_by_reason"] == {"missing_file": 1, "bad_row": 1}
    assert info["samples"] == alone["samples"] and info["counts"]["documents"] == 12
    assert [s["sha256"] for s in info["shards"]] == [s["sha256"] for s in alone["shards"]]  # the same corpus
    assert info["source_items"] == info["samples"] + info["rejected"]
