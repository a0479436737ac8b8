"""Builds against a real S3 server (radosgw; moto's server as the fallback): same bytes as local."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.faultproxy import FaultProxy, Hold
from tests.helpers import D2V, kill_when_held, run_d2v

pytestmark = [pytest.mark.s3, pytest.mark.slow]

SUBSETS = ("train-clean-100", "dev-clean")
BUILD_ARGS = ["--subsets", ",".join(SUBSETS), "--shard-size", "5", "--mask-variants", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic.make_librispeech(str(tmp_path_factory.mktemp("ls")), {"train-clean-100": 16, "dev-clean": 5},
                                      seed=2, faults=True)


@pytest.fixture(scope="module")
def local_build(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    dataset = build_dataset(LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(out)),
                            BuildOptions(ShardSize.parse("5"), 2, 3), workers=0, echo=lambda *_: None)
    return [(s.name, s.sha256) for s in dataset.shards]


def _s3_dataset(s3_server, url: str) -> dict:
    fs = s3_server.filesystem()
    return json.loads(fs.cat_file(url + "/dataset.json"))


def test_local_and_s3_outputs_have_identical_shards_and_resume(corpus, local_build, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/librispeech"
    env = s3_server.env()
    result = run_d2v("data", "build", "librispeech", corpus.source, url, *BUILD_ARGS, "--workers", "2", env=env)
    assert "(0 already done)" in result.stdout
    remote = _s3_dataset(s3_server, url)
    assert [(s["name"], s["sha256"]) for s in remote["shards"]] == local_build
    assert remote["source_items"] == remote["samples"] + remote["rejected"]

    info = json.loads(run_d2v("data", "inspect", url, "--json", env=env).stdout)
    assert info["samples"] == remote["samples"] and set(info["splits"]) == set(SUBSETS)
    assert run_d2v("data", "verify", url, env=env).returncode == 0

    # An interrupted build: one shard's index never published, dataset.json not yet written.
    fs = s3_server.filesystem()
    fs.rm_file(f"{url}/{remote['shards'][0]['index']}")
    fs.rm_file(f"{url}/dataset.json")
    result = run_d2v("data", "build", "librispeech", corpus.source, url, *BUILD_ARGS, "--workers", "0", env=env)
    assert f"({len(local_build) - 1} already done)" in result.stdout
    fs.invalidate_cache()
    assert [(s["name"], s["sha256"]) for s in _s3_dataset(s3_server, url)["shards"]] == local_build


def test_a_corpus_on_s3_builds_the_same_shards(corpus, local_build, s3_server, s3_bucket, tmp_path):
    fs = s3_server.filesystem()
    root = Path(corpus.source)
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{s3_bucket}/corpus/{path.relative_to(root)}", path.read_bytes())
    out = tmp_path / "from-s3"
    run_d2v("data", "build", "librispeech", f"s3://{s3_bucket}/corpus", str(out), *BUILD_ARGS, "--workers", "0",
            env=s3_server.env())
    built = json.loads((out / "dataset.json").read_text())
    assert [(s["name"], s["sha256"]) for s in built["shards"]] == local_build
    assert built["source"] == f"s3://{s3_bucket}/corpus"


def test_verify_on_s3_names_a_damaged_shard(corpus, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/damaged"
    env = s3_server.env()
    run_d2v("data", "build", "librispeech", corpus.source, url, *BUILD_ARGS, "--workers", "0", env=env)
    fs = s3_server.filesystem()
    victim = _s3_dataset(s3_server, url)["shards"][-1]["name"]
    data = bytearray(fs.cat_file(f"{url}/{victim}"))
    data[-20000] ^= 1
    fs.pipe_file(f"{url}/{victim}", bytes(data))
    result = run_d2v("data", "verify", url, env=env, check=False)
    assert result.returncode == 1 and victim in result.stderr


def _start_upload(fs, bucket: str, key: str) -> None:
    """A multipart upload left unfinished, as a build or checkpoint killed mid-upload leaves it."""
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)


def _uploads(fs, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) or [])


def test_a_killed_builds_unfinished_uploads_are_aborted_by_the_next_build_or_verify_repair(corpus, s3_server,
                                                                                         s3_bucket):
    fs, env = s3_server.filesystem(), s3_server.env()
    url = f"s3://{s3_bucket}/ls"
    _start_upload(fs, s3_bucket, "ls/shards/train-clean-100-000001.tar")
    _start_upload(fs, s3_bucket, "other/run/big.bin")  # not the build's: left alone
    result = run_d2v("data", "build", "librispeech", corpus.source, url, *BUILD_ARGS, "--workers", "0", env=env)
    assert "aborted 1 unfinished upload(s) a killed build left: ls/shards/train-clean-100-000001.tar" in result.stdout
    assert _uploads(fs, s3_bucket) == ["other/run/big.bin"]
    _start_upload(fs, s3_bucket, "ls/index/dev-clean-000000.parquet")
    result = run_d2v("data", "verify", url, "--repair", env=env)
    assert "repair: aborted 1 unfinished upload(s): ls/index/dev-clean-000000.parquet" in result.stdout
    assert result.stdout.rstrip().endswith("samples verified") and _uploads(fs, s3_bucket) == ["other/run/big.bin"]


@pytest.mark.parametrize("moment", ["index", "dataset.json"])
def test_a_build_killed_mid_upload_never_shows_a_partial_object_and_its_rerun_equals_a_clean_build(
        corpus, local_build, s3_server, s3_bucket, moment):
    """SIGKILL while a shard is being published (its tar stored, half of its index sent) or while
    dataset.json is half sent: the server keeps no part of the cut object, a reader finds no
    dataset, and the rerun skips what was published and ends with the clean build's shards."""
    url, env, fs = f"s3://{s3_bucket}/killed", s3_server.env(), s3_server.filesystem()
    command = [*D2V, "data", "build", "librispeech", corpus.source, url, *BUILD_ARGS, "--workers", "0"]
    cut = "killed/index/train-clean-100-000001.parquet" if moment == "index" else "killed/dataset.json"
    with FaultProxy(s3_server.endpoint_url, hold=Hold("PUT", f"/{cut}$", "partway")) as proxy:
        kill_when_held(command, proxy, env)
    fs.invalidate_cache()
    stored = fs.find(f"{s3_bucket}/killed")
    assert f"{s3_bucket}/{cut}" not in stored and f"{s3_bucket}/killed/dataset.json" not in stored
    if moment == "index":  # the tar was published before its index was cut off
        assert f"{s3_bucket}/killed/shards/train-clean-100-000001.tar" in stored
    result = run_d2v("data", "inspect", url, env=env, check=False)
    assert result.returncode != 0 and "its build has not finished" in result.stderr

    result = run_d2v("data", "build", "librispeech", corpus.source, url, *BUILD_ARGS, "--workers", "0", env=env)
    done = sum("/killed/index/" in path for path in stored)  # shards published whole before the kill
    names = [name for name, _ in local_build]  # in build order (--workers 0)
    assert done == (len(names) if moment == "dataset.json" else names.index("shards/train-clean-100-000001.tar"))
    assert f"({done} already done)" in result.stdout, result.stdout
    fs.invalidate_cache()
    assert [(s["name"], s["sha256"]) for s in _s3_dataset(s3_server, url)["shards"]] == local_build
    assert _uploads(fs, s3_bucket) == []
