"""Epoch plans from metadata: coverage per world size, determinism, token budgets, crops, elasticity."""
from __future__ import annotations

import numpy as np
import pytest

from d2v_train.data.index import SplitIndex
from d2v_train.data.plan import BatchPolicy, plan_epoch, rank_batch_numbers
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location


@pytest.fixture(scope="module")
def speech_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("ls")
    spec = synthetic.make_librispeech(str(root / "c"), {"train-clean-100": 30}, seed=5, seconds=(0.8, 5.0))
    build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100",)), Location(str(root / "d")),
                  BuildOptions(ShardSize.parse("4"), 2, 0), workers=0, echo=lambda *_: None)
    return SplitIndex.load(Location(str(root / "d")), "train-clean-100")


@pytest.fixture(scope="module")
def image_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    spec = synthetic.make_imagenet(str(root / "c"), classes=3, train_per_class=9, val_per_class=0, seed=1)
    build_dataset(ImageNetSource(Location(spec.source), ("train",)), Location(str(root / "d")),
                  BuildOptions(ShardSize.parse("4"), 2, 0), workers=0, echo=lambda *_: None)
    return SplitIndex.load(Location(str(root / "d")), "train")


SPEECH = BatchPolicy(max_tokens=120_000, min_sample_size=32_000, max_sample_size=64_000, shuffle_block=2)
IMAGES = BatchPolicy(batch_size=4, shuffle_block=2)


def _keys(index, batches) -> list[str]:
    return [index.columns["key"][i] for b in batches for i in b.samples]


@pytest.mark.parametrize("which", ["speech", "images"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_one_epoch_over_all_ranks_covers_every_sample_once(which, world_size, speech_index, image_index):
    index, policy = (speech_index, SPEECH) if which == "speech" else (image_index, IMAGES)
    batches = plan_epoch(index, policy, seed=3, epoch=0)
    eligible = {index.columns["key"][i] for i in range(len(index))
                if which == "images" or index.lengths[i] >= policy.min_sample_size}
    assert sorted(_keys(index, batches)) == sorted(eligible)  # the plan holds each eligible sample once
    served = [rank_batch_numbers(len(batches), 0, r, world_size, "drop") for r in range(world_size)]
    assert len({len(s) for s in served}) == 1, "every rank gets the same number of batches"
    numbers = sorted(g for s in served for g, _ in s)
    tail = len(batches) % world_size
    assert numbers == list(range(len(batches) - tail)), "only the documented tail is left out"
    for r, s in enumerate(served):
        assert all(g % world_size == r for g, _ in s)


def test_plans_are_deterministic_and_change_with_seed_and_epoch(speech_index, image_index):
    for index, policy in ((speech_index, SPEECH), (image_index, IMAGES)):
        first = plan_epoch(index, policy, seed=3, epoch=0)
        again = plan_epoch(index, policy, seed=3, epoch=0)
        assert _keys(index, first) == _keys(index, again)
        assert [b.crop_length for b in first] == [b.crop_length for b in again]
        assert _keys(index, plan_epoch(index, policy, seed=4, epoch=0)) != _keys(index, first)
        assert _keys(index, plan_epoch(index, policy, seed=3, epoch=1)) != _keys(index, first)


def test_speech_batches_fill_the_budget_and_crop_on_the_frame_grid(speech_index):
    lengths = speech_index.lengths
    for batch in plan_epoch(speech_index, SPEECH, seed=0, epoch=0):
        capped = np.minimum(lengths[batch.samples], SPEECH.max_sample_size)
        assert len(batch.samples) == 1 or len(batch.samples) * capped.max() <= SPEECH.max_tokens
        assert batch.crop_length == capped.min()
        assert (batch.crop_offsets % 320 == 0).all() and (batch.crop_offsets >= 0).all()
        assert (batch.crop_offsets + batch.crop_length <= lengths[batch.samples]).all()
    short = lengths < SPEECH.min_sample_size
    assert short.any(), "the corpus should hold utterances under min_sample_size"


def test_shards_stay_together_within_shuffle_blocks(image_index):
    policy = BatchPolicy(batch_size=4, shuffle_block=1)
    shard_of = image_index.columns["shard"]
    sequence = [int(shard_of[i]) for b in plan_epoch(image_index, policy, 0, 0) for i in b.samples]
    changes = sum(a != b for a, b in zip(sequence, sequence[1:]))
    assert changes == len(image_index.shards) - 1, "with blocks of one shard, each shard is read in one run"


def test_elastic_restart_serves_the_remaining_batches_at_any_world_size(image_index):
    batches = plan_epoch(image_index, IMAGES, seed=1, epoch=0)
    total = len(batches)
    done = 2 * 1  # two ranks each consumed one batch
    before = {g for r in range(2) for g, _ in rank_batch_numbers(total, 0, r, 2, "drop")[:1]}
    for new_world in (1, 3):
        after = [g for r in range(new_world) for g, _ in rank_batch_numbers(total, done, r, new_world, "drop")]
        tail = (total - done) % new_world
        assert sorted(before | set(after)) == list(range(total - tail))
        assert not before & set(after)


def test_pad_tail_repeats_batches_flagged_as_padding():
    served = [rank_batch_numbers(7, 0, r, 3, "pad") for r in range(3)]
    assert [len(s) for s in served] == [3, 3, 3]
    padding = [g for s in served for g, pad in s if pad]
    assert padding == [0, 1] and sorted(g for s in served for g, pad in s if not pad) == list(range(7))


def test_policy_errors_name_the_option():
    with pytest.raises(ValueError, match="batch_size and max_tokens"):
        BatchPolicy()
    with pytest.raises(ValueError, match="tail"):
        BatchPolicy(batch_size=2, tail="wrap")
