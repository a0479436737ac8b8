"""`d2v data build text FILE... OUT` as a user runs it: train a tokenizer, then reuse it."""
from __future__ import annotations

from pipelines import synthetic
from tests.helpers import inspect_json, read_dataset_json, run_d2v


def test_build_text_trains_then_reuses_the_committed_tokenizer(tmp_path):
    spec = synthetic.make_text_corpus(str(tmp_path / "corpus"), files=2, docs_per_file=5, seed=4, faults=True)
    first = tmp_path / "first"
    run_d2v("data", "build", "text", *spec.files, str(first), "--vocab-size", "400", "--shard-size", "8",
            "--valid-fraction", "0.2", "--workers", "0")
    info = inspect_json(str(first))
    assert info["source_items"] == info["samples"] + info["rejected"]
    assert info["rejects_by_reason"] == {"invalid_utf8": 1}
    assert set(info["splits"]) == {"train", "valid"}
    assert all(split["tokens"] > 0 for split in info["splits"].values())

    second = tmp_path / "second"
    run_d2v("data", "build", "text", *spec.files, str(second), "--tokenizer", str(first / "tokenizer"),
            "--shard-size", "8", "--valid-fraction", "0.2", "--workers", "0")
    a, b = read_dataset_json(first), read_dataset_json(second)
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_build_text_needs_a_vocabulary_choice_and_an_output(tmp_path):
    spec = synthetic.make_text_corpus(str(tmp_path / "corpus"), files=1, docs_per_file=2, seed=1)
    result = run_d2v("data", "build", "text", *spec.files, str(tmp_path / "out"), "--workers", "0", check=False)
    assert result.returncode == 2 and "--vocab-size" in result.stderr
    result = run_d2v("data", "build", "text", str(tmp_path / "out"), "--vocab-size", "300", check=False)
    assert result.returncode == 2 and "FILE" in result.stderr
    assert "Traceback" not in result.stderr
