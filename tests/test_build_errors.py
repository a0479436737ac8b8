"""Bad input and bad outputs: clear errors, nothing half-committed."""
from __future__ import annotations

import json
import time

import pytest

from pipelines import synthetic
from pipelines.build import EmptyCorpusError, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.helpers import run_d2v


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic.make_librispeech(str(tmp_path_factory.mktemp("ls")), {"train-clean-100": 3}, seed=1)


def test_an_empty_subset_is_a_clear_error_and_commits_nothing(tmp_path):
    (tmp_path / "LibriSpeech" / "train-clean-100").mkdir(parents=True)
    out = tmp_path / "out"
    result = run_d2v("data", "build", "librispeech", str(tmp_path / "LibriSpeech"), str(out),
                     "--subsets", "train-clean-100", "--workers", "0", check=False)
    assert result.returncode == 2
    assert "no usable speech items" in result.stderr
    assert not (out / "dataset.json").exists()


def test_a_corpus_of_only_bad_items_reports_why_and_commits_nothing(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2-0000.flac").write_bytes(b"")
    (chapter / "1-2.trans.txt").write_text("1-2-0000 HELLO\n1-2-0001 WORLD\n")
    with pytest.raises(EmptyCorpusError, match="empty_audio=1|empty_audio': 1|missing_audio"):
        build_dataset(LibriSpeechSource(Location(str(tmp_path / "LibriSpeech")), ("dev-clean",)),
                      Location(str(tmp_path / "out")), workers=0, echo=lambda *_: None)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_an_unwritable_output_fails_before_any_work(corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_d2v("data", "build", "librispeech", corpus.source, str(blocker / "out"),
                     "--subsets", "train-clean-100", "--workers", "0", check=False)
    assert result.returncode == 2
    assert "cannot write to output" in result.stderr
    assert "scanning" not in result.stdout


def test_an_unreachable_object_store_fails_fast_and_clearly(corpus):
    options = json.dumps({"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    started = time.monotonic()
    result = run_d2v("data", "build", "librispeech", corpus.source, "s3://bucket/out", "--subsets", "train-clean-100",
                     "--workers", "0", "--storage-options", options, check=False)
    assert result.returncode == 2
    assert "s3://bucket/out" in result.stderr and "scanning" not in result.stdout
    assert time.monotonic() - started < 60


def test_a_missing_source_folder_is_a_clear_error(tmp_path):
    result = run_d2v("data", "build", "librispeech", str(tmp_path / "nowhere"), str(tmp_path / "out"),
                     "--subsets", "dev-clean", "--workers", "0", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_bad_options_name_the_option(corpus, tmp_path):
    result = run_d2v("data", "build", "librispeech", corpus.source, str(tmp_path / "out"), "--subsets",
                     "train-clean-100", "--shard-size", "lots", "--workers", "0", check=False)
    assert result.returncode == 2 and "--shard-size" in result.stderr
    result = run_d2v("data", "build", "librispeech", corpus.source, str(tmp_path / "out"), "--subsets",
                     "train-clean-100", "--mask-variants", "0", "--workers", "0", check=False)
    assert result.returncode == 2 and "--mask-variants" in result.stderr


def test_inspect_of_a_folder_without_dataset_json_says_so(tmp_path):
    result = run_d2v("data", "inspect", str(tmp_path), check=False)
    assert result.returncode == 2 and "no dataset.json" in result.stderr


def test_shard_size_parsing():
    assert ShardSize.parse("1000").max_samples == 1000
    assert ShardSize.parse("256MB").max_bytes == 256_000_000
    assert ShardSize.parse("1GiB").max_bytes == 2**30
    for bad in ("0", "1.5", "-3", "MB", "12 parsecs"):
        with pytest.raises(ValueError, match="--shard-size"):
            ShardSize.parse(bad)
