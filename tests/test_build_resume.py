"""Interrupted builds: a re-run skips finished shards and ends with exactly a clean build's shards."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.helpers import D2V, REPO, read_dataset_json

SUBSETS = ("train-clean-100", "dev-clean")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("librispeech")
    return synthetic.make_librispeech(str(root), {"train-clean-100": 40, "dev-clean": 8}, seed=11,
                                      seconds=(3.0, 8.0), faults=True)


def _clean_build(corpus, out: Path, shard_size: str = "1"):
    return build_dataset(
        LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(out)),
        BuildOptions(ShardSize.parse(shard_size), mask_variants=2, seed=0), workers=0, echo=lambda *_: None,
    )


def _build_command(corpus, out: Path, workers: str) -> list[str]:
    return [*D2V, "data", "build", "librispeech", corpus.source, str(out), "--subsets", ",".join(SUBSETS),
            "--shard-size", "1", "--mask-variants", "2", "--seed", "0", "--workers", workers]


@pytest.mark.dask
@pytest.mark.slow
def test_sigkill_of_the_whole_process_tree_then_rerun_equals_a_clean_build(corpus, tmp_path):
    reference = _clean_build(corpus, tmp_path / "clean")
    out = tmp_path / "killed"
    process = subprocess.Popen(_build_command(corpus, out, "2"), cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    index = out / "index"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if index.is_dir() and len(list(index.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI, its Dask scheduler, nannies and workers
    process.wait(timeout=30)
    done = len(list(index.glob("*.parquet")))
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()
    assert 0 < done < len(reference.shards), f"the kill should land mid-build ({done} of {len(reference.shards)} done)"
    assert not (out / "dataset.json").exists()

    rerun = subprocess.run(_build_command(corpus, out, "2"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout
    summary = [line for line in rerun.stdout.splitlines() if "already done" in line][-1]
    skipped = int(summary.split("(")[1].split(" already done")[0])
    assert skipped >= done - 2  # shards whose index was published before the kill are not rebuilt

    resumed = read_dataset_json(out)
    assert [(s["name"], s["sha256"]) for s in resumed["shards"]] == [(s.name, s.sha256) for s in reference.shards]
    assert resumed["rejects_by_reason"] == reference.rejects_by_reason
    assert resumed["source_items"] == resumed["samples"] + resumed["rejected"]
    named = {s["name"] for s in resumed["shards"]}
    on_disk = {f"shards/{p.name}" for p in (out / "shards").iterdir()}
    assert on_disk == named, "no partial or temporary file is left beside the shards"
    for shard in resumed["shards"]:
        assert (out / shard["name"]).stat().st_size == shard["bytes"]


def test_a_tar_without_its_index_or_of_the_wrong_size_is_rebuilt(corpus, tmp_path):
    reference = _clean_build(corpus, tmp_path / "clean", shard_size="6")
    out = tmp_path / "partial"
    _clean_build(corpus, out, shard_size="6")
    first, second = reference.shards[0], reference.shards[1]
    (out / first.index).unlink()  # killed between publishing the tar and its index
    (out / second.name).write_bytes((out / second.name).read_bytes()[:1000])  # a torn tar
    (out / "shards" / ".x.tar.0123.tmp").write_bytes(b"left by a killed writer")
    (out / "dataset.json").unlink()
    messages: list[str] = []
    resumed = _clean_build_echo(corpus, out, messages)
    assert [(s.name, s.sha256) for s in resumed.shards] == [(s.name, s.sha256) for s in reference.shards]
    assert f"({len(reference.shards) - 2} already done)" in messages[-1]
    assert not list((out / "shards").glob(".*.tmp"))


def test_rebuild_with_other_parameters_replaces_the_dataset(corpus, tmp_path):
    out = tmp_path / "out"
    _clean_build(corpus, out, shard_size="6")
    before = read_dataset_json(out)
    other = BuildOptions(ShardSize.parse("12"), mask_variants=3, seed=0)
    with pytest.raises(ValueError, match="holds a dataset built with other inputs or parameters.*--overwrite"):
        build_dataset(LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(out)), other, workers=0,
                      echo=lambda *_: None)
    assert read_dataset_json(out) == before  # refused: nothing touched
    messages: list[str] = []
    rebuilt = build_dataset(
        LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(out)),
        BuildOptions(ShardSize.parse("12"), mask_variants=3, seed=0, overwrite=True), workers=0,
        echo=messages.append,
    )
    assert "(0 already done)" in messages[-1]
    assert any("replacing" in m for m in messages)
    assert read_dataset_json(out)["mask"]["variants"] == 3 == rebuilt.mask.variants
    on_disk = {str(p.relative_to(out)) for p in (out / "shards").iterdir()}
    assert on_disk == {s.name for s in rebuilt.shards}, "the old build's shards are gone"


def _clean_build_echo(corpus, out, messages):
    return build_dataset(
        LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(out)),
        BuildOptions(ShardSize.parse("6"), mask_variants=2, seed=0), workers=0, echo=messages.append,
    )
