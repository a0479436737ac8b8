"""Several splits and datasets streamed as one: LibriSpeech's three training subsets as one epoch
plan, weights and repeats, coverage and exact/elastic resume across the mix, and the errors."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from d2v_train.config import DataConfig, load_train_config
from d2v_train.data.loader import StreamingLoader
from d2v_train.data.mix import MixPart, epoch_counts, multiplicity
from d2v_train.data.plan import BatchPolicy
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.helpers import run_d2v

SUBSETS = {"train-clean-100": 9, "train-clean-360": 15, "train-other-500": 6}
POLICY = BatchPolicy(max_tokens=100_000, min_sample_size=16_000, max_sample_size=48_000, shuffle_block=2,
                     tail="pad")


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory) -> Path:
    """LibriSpeech's three training subsets, built into one dataset (a split each)."""
    root = tmp_path_factory.mktemp("mix")
    spec = synthetic.make_librispeech(str(root / "corpus"), SUBSETS, seed=4, seconds=(2.1, 3.0))
    build_dataset(LibriSpeechSource(Location(spec.source), tuple(SUBSETS)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("4"), 2, 0), workers=0, echo=lambda *_: None)
    return root / "data"


def _parts(url, **rule) -> list[MixPart]:
    return [MixPart(str(url), split, **({k: v[n] for k, v in rule.items()})) for n, split in enumerate(SUBSETS)]


def _run(parts, *, rank=0, world_size=1, state=None, limit=None, epochs=1):
    loader = StreamingLoader(None, "", POLICY, mix=parts, rank=rank, world_size=world_size, seed=5, workers=2)
    if state:
        loader.load_state_dict(state)
    batches = []
    for _ in range(epochs):
        for batch in loader:
            batches.append(batch)
            if limit is not None and len(batches) >= limit:
                break
        if limit is not None and len(batches) >= limit:
            break
    state = loader.state_dict()
    names = loader.index.names
    loader.close()
    return batches, state, names


def _served(batches) -> list[tuple[int, str]]:
    return [(s, k) for b in batches if not b["padding"] for s, k in zip(b["sources"], b["keys"])]


def test_three_subsets_as_one_epoch_serve_every_sample_once_across_ranks(librispeech):
    parts = _parts(librispeech)
    seen = []
    for rank in range(2):
        batches, _, names = _run(parts, rank=rank, world_size=2)
        seen += _served(batches)
    assert names == list(SUBSETS)
    assert sorted(k for _, k in seen) == sorted(set(k for _, k in seen)) and len(seen) == sum(SUBSETS.values())
    for source, key in seen:  # each sample labelled with the subset it came from
        assert key.split("-")[0] in _speakers(librispeech, list(SUBSETS)[source])
    # batches mix the subsets: the plan shuffles shards of all of them together
    assert any(len(set(b["sources"])) > 1 for b in batches)


def _speakers(dataset: Path, split: str) -> set[str]:
    import pyarrow.parquet as pq

    from pipelines.inspection import read_dataset

    found, _, _ = read_dataset(Location(str(dataset)))
    return {k.split("-")[0] for s in found.shards_of(split) for k in pq.read_table(dataset / s.index)["key"].to_pylist()}


def test_resume_across_the_mix_is_exact_and_elastic(librispeech):
    parts = _parts(librispeech, weight=[1.0, 1.0, 2.0])
    whole, _, _ = _run(parts, epochs=2)
    reference = [b["keys"] for b in whole]
    first, state, _ = _run(parts, limit=5)
    rest, _, _ = _run(parts, state=state, epochs=2)
    assert [b["keys"] for b in first + rest] == reference  # a fresh loader continues batch for batch
    # at another world size: the two ranks together serve exactly what was left of the epoch
    left = [k for b in whole[5:] if b["epoch"] == 0 for k in b["keys"]]
    elastic = []
    for rank in range(2):
        batches, _, _ = _run(parts, rank=rank, world_size=2, state=state)
        elastic += [k for b in batches if not b["padding"] for k in b["keys"]]
    assert Counter(elastic) == Counter(left)


def test_weights_share_each_epoch_and_upsampled_samples_repeat(librispeech):
    sizes = list(SUBSETS.values())
    parts = _parts(librispeech, weight=[1.0, 1.0, 2.0])
    batches, _, _ = _run(parts, epochs=2)
    for epoch in (0, 1):
        served = Counter(s for b in batches if b["epoch"] == epoch and not b["padding"] for s in b["sources"])
        counts = epoch_counts(sizes, parts)
        assert counts == [8, 7, 15] and sum(counts) == sum(sizes)
        assert [served[n] for n in range(3)] == counts
        shares = np.array([served[n] for n in range(3)]) / sum(counts)
        assert np.allclose(shares, [0.25, 0.25, 0.5], atol=0.04)  # the weights, up to rounding
        keys = Counter(k for b in batches if b["epoch"] == epoch for s, k in zip(b["sources"], b["keys"]) if s == 2)
        assert len(keys) == SUBSETS["train-other-500"] and set(keys.values()) == {2, 3}  # 15 from 6: 2 or 3 each
    # down-sampled parts draw another subset each epoch
    clean360 = [{k for b in batches if b["epoch"] == e for s, k in zip(b["sources"], b["keys"]) if s == 1}
                for e in (0, 1)]
    assert len(clean360[0]) == len(clean360[1]) == 7 and clean360[0] != clean360[1]


def test_repeat_counts_and_the_stream_command(librispeech, tmp_path):
    parts = _parts(librispeech, repeat=[1.0, 0.4, 2.0])
    batches, _, _ = _run(parts)
    served = Counter(s for b in batches if not b["padding"] for s in b["sources"])
    assert [served[n] for n in range(3)] == [9, 6, 12]
    # d2v data stream: a comma-separated --split, or --mix FILE with the trainer's data.sources fields
    mix = tmp_path / "mix.yaml"
    mix.write_text("".join(f"- {{url: {librispeech}, split: {s}, repeat: {r}}}\n"
                           for s, r in zip(SUBSETS, (1, 0.4, 2))))
    out = run_d2v("data", "stream", "--mix", str(mix), "--max-tokens", "100000", "--keys-out",
                  str(tmp_path / "keys.txt")).stdout
    assert "per source train-clean-100=9 train-clean-360=6 train-other-500=12" in out
    assert len((tmp_path / "keys.txt").read_text().split()) == 27
    out = run_d2v("data", "stream", str(librispeech), "--split", ",".join(SUBSETS), "--max-tokens", "100000").stdout
    assert "per source train-clean-100=9 train-clean-360=15 train-other-500=6" in out


def test_two_datasets_mix_and_incompatible_ones_are_refused(librispeech, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(librispeech, copy)  # a second dataset at another URL
    parts = [MixPart(str(librispeech), "train-clean-100", repeat=1.0),
             MixPart(str(copy), "train-clean-100", repeat=1.0, name="copy")]
    batches, _, names = _run(parts)
    assert names == [f"{librispeech}#train-clean-100", "copy"]
    served = Counter(_served(batches))
    assert sum(served.values()) == 18 and {n for n, _ in served} == {0, 1} and max(served.values()) == 1

    spec = synthetic.make_imagenet(str(tmp_path / "img"), classes=2, train_per_class=2, val_per_class=0, seed=1)
    build_dataset(ImageNetSource(Location(spec.source), ("train",)), Location(str(tmp_path / "images")),
                  BuildOptions(ShardSize.parse("4"), 1, 0), workers=0, echo=lambda *_: None)
    with pytest.raises(ValueError, match=r"data.sources\[1\] .* has modality 'vision', data.sources\[0\] has "
                                         r"'speech': the parts of a mix must agree"):
        _run([MixPart(str(librispeech), "train-clean-100"), MixPart(str(tmp_path / "images"), "train")])


def test_mix_rules_in_numbers():
    rng = np.random.default_rng(0)
    assert multiplicity(4, 10, rng).tolist().count(3) == 2 and multiplicity(4, 10, rng).sum() == 10
    assert multiplicity(5, 2, rng).sum() == 2 and set(multiplicity(5, 2, rng).tolist()) == {0, 1}
    parts = [MixPart("a", "x", weight=1), MixPart("a", "y", weight=3)]
    assert epoch_counts([10, 30], parts) == [10, 30] and epoch_counts([30, 10], parts) == [10, 30]
    assert epoch_counts([3, 3], [MixPart("a", "x", repeat=0.5), MixPart("a", "y")]) == [2, 3]


@pytest.mark.parametrize("data, message", [
    ({"url": "d", "sources": [{"url": "d"}]}, "leave out data.url and data.splits"),
    ({"sources": [{"url": "d", "weight": 1}, {"url": "e"}]}, "give every source a weight, or none"),
    ({"sources": [{"url": "d", "weight": 1, "repeat": 2}]}, "give weight or repeat, not both"),
    ({"sources": [{"url": "d", "weight": 0}]}, r"data.sources.0.weight\n  Input should be greater than 0"),
    ({"url": "d", "splits": ["a", "a"]}, "data.splits: name one or more different splits"),
    ({"split": "a"}, "data.url: the dataset to train on is missing"),
])
def test_wrong_mix_settings_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, ["model=speech_tiny", "train.max_steps=1", "data.max_tokens=1000"]
                          + [f"data.{k}={json.dumps(v)}" for k, v in data.items()])
    assert DataConfig(url="d", max_tokens=1).mix() is None


@pytest.mark.torchrun
@pytest.mark.slow
def test_pretraining_on_the_weighted_mix_logs_each_source_and_resumes_exactly(librispeech, tmp_path):
    from tests.test_trainer import _copy_run, metrics, train

    sources = json.dumps([{"url": str(librispeech), "split": s, "weight": w} for s, w in zip(SUBSETS, (1, 1, 2))])
    mix = ["data.url=null", f"data.sources={sources}", "train.max_steps=6", "data.max_tokens=100000"]
    whole = tmp_path / "whole"
    train(whole, "unused", *mix, ranks=1)
    records = metrics(whole)
    assert [r["step"] for r in records] == list(range(1, 7))
    last = records[-1]
    speakers = {split: _speakers(librispeech, split) for split in SUBSETS}
    assert not set.intersection(*speakers.values())
    trained = Counter(next(s for s in SUBSETS if k.split("-")[0] in speakers[s])
                      for line in (whole / "keys-rank0.jsonl").read_text().splitlines()
                      for k in json.loads(line)["keys"])
    assert {s: last[f"samples/{s}"] for s in SUBSETS} == {s: trained[s] for s in SUBSETS}
    resumed = tmp_path / "resumed"
    _copy_run(whole, resumed, 2)
    result = train(resumed, "unused", *mix, ranks=1)
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert (resumed / "keys-rank0.jsonl").read_text() == (whole / "keys-rank0.jsonl").read_text()
    for a, b in zip(metrics(resumed), records):
        assert a["loss"] == b["loss"] and a["step"] == b["step"]
