"""The columnar epoch planner (d2v_train/data/plan.py) against the row-by-row planner it replaced,
kept here as the reference: the same batches in the same order, the same crops, for speech
token budgets (training and evaluation), fixed batch sizes, restricted indexes and tied
lengths, so resume and coverage guarantees carry over unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from d2v_train.data.index import SplitIndex
from d2v_train.data.plan import BatchPolicy, epoch_blocks, greedy_group_ends, plan_epoch
from pipelines.storage import Location
from tests.test_loader_plan import image_index, speech_index  # noqa: F401 - fixtures built by the real builder


# -- the previous planner, row by row --------------------------------------------------------------
def _rng(seed: int, epoch: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *salt])


def _reference_groups(index, block, policy):
    lengths = index.lengths[block]
    if policy.crop:
        keep = lengths >= policy.min_sample_size
        block, lengths = block[keep], np.minimum(lengths[keep], policy.max_sample_size)
    order = np.argsort(lengths, kind="stable")
    block, lengths = block[order], lengths[order]
    groups, start = [], 0
    for end in range(1, len(block) + 1):
        if end - start > 1 and (end - start) * lengths[end - 1] > policy.max_tokens:
            groups.append(block[start: end - 1])
            start = end - 1
    if start < len(block):
        groups.append(block[start:])
    return groups


def reference_plan(index, policy, seed, epoch, hop=320):
    """(number, samples, crop_length, crop_offsets) of every batch, as the row-by-row planner made them."""
    out = []
    for block_number, block in enumerate(epoch_blocks(index, policy, seed, epoch)):
        if policy.max_tokens is not None:
            groups = _reference_groups(index, block, policy)
        else:
            groups = [block[i: i + policy.batch_size] for i in range(0, len(block), policy.batch_size)]
        if policy.shuffle and policy.max_tokens is not None:
            groups = [groups[i] for i in _rng(seed, epoch, 3, block_number).permutation(len(groups))]
        for group in groups:
            number = len(out)
            if index.modality == "speech" and policy.crop:
                lengths = index.lengths[group]
                target = int(min(lengths.min(), policy.max_sample_size))
                offsets = (_rng(seed, epoch, 4, number).integers(0, (lengths - target) // hop + 1) * hop)
                out.append((number, group.tolist(), target, offsets.astype(np.int64).tolist()))
            else:
                out.append((number, group.tolist(), None, None))
    return out


def _as_tuples(plan):
    return [(b.number, b.samples.tolist(), b.crop_length,
             None if b.crop_offsets is None else b.crop_offsets.tolist()) for b in plan]


# -- the comparison --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scale_index(tmp_path_factory):
    from pipelines.synthetic.scale import make_index_only_dataset

    root = tmp_path_factory.mktemp("index-only")
    make_index_only_dataset(str(root), shards=13, samples_per_shard=57, seed=2)
    return SplitIndex.load(Location(str(root)), "train")


POLICIES = [
    BatchPolicy(max_tokens=1_400_000, min_sample_size=32_000, max_sample_size=320_000),  # training
    BatchPolicy(max_tokens=600_000, min_sample_size=16_000, max_sample_size=250_000, shuffle_block=3),
    BatchPolicy(max_tokens=1_000_000, shuffle=False, crop=False, tail="pad"),  # evaluation: whole utterances
    BatchPolicy(max_tokens=100_000, shuffle_block=1),  # budgets below some utterances: those go alone
    BatchPolicy(batch_size=7),
    BatchPolicy(batch_size=16, shuffle=False, shuffle_block=2),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (3, 1), (11, 7)])
def test_the_columnar_plan_equals_the_row_by_row_plan(scale_index, policy, seed, epoch):
    plan = plan_epoch(scale_index, policy, seed, epoch)
    assert _as_tuples(plan) == reference_plan(scale_index, policy, seed, epoch)
    assert len(plan) > 5


def test_tied_lengths_restricted_rows_and_the_small_fixtures_plan_alike(scale_index, speech_index, image_index):  # noqa: F811
    tied = scale_index.select(np.random.default_rng(0).permutation(len(scale_index))[:500])  # out of shard order
    tied.columns["length"] = (tied.lengths // 48_000 + 1) * 48_000  # many equal lengths: stable order decides
    for index, policy in ((tied, POLICIES[0]), (tied, POLICIES[2]), (tied, POLICIES[4]),
                          (speech_index, BatchPolicy(max_tokens=160_000, min_sample_size=16_000,
                                                     max_sample_size=48_000)),
                          (image_index, BatchPolicy(batch_size=4))):
        for seed, epoch in ((0, 0), (5, 2)):
            assert _as_tuples(plan_epoch(index, policy, seed, epoch)) == reference_plan(index, policy, seed, epoch)


def test_a_plan_is_a_sequence_of_batches_made_on_demand(scale_index):
    plan = plan_epoch(scale_index, POLICIES[0], 0, 0)
    assert plan[-1].number == len(plan) - 1 and [b.number for b in plan[2:5]] == [2, 3, 4]
    assert _as_tuples([plan[3]]) == _as_tuples([plan[3]])  # the same crop each time it is asked for
    with pytest.raises(IndexError):
        plan[len(plan)]


def test_greedy_group_ends_on_hand_made_segments():
    lengths = np.array([1, 2, 2, 5, 9, 3, 3, 3, 10], dtype=np.int64)
    ends = greedy_group_ends(lengths, np.array([0, 5, 9]), np.array([5, 9, 9]), budget=6)
    # segment 0: [1,2,2] fits 3x2=6, then [5], then [9] alone (over the budget); segment 1: [3,3] then [3]
    assert [e.tolist() for e in ends] == [[3, 4, 5], [7, 8, 9], []]


def test_a_build_writes_each_splits_plan_file_and_the_loader_opens_the_split_from_it(tmp_path):
    """One read opens a split (the plan file, its sha256 checked); without one (an older build)
    every index file is read instead, to the same index; verify checks the file."""
    import json
    import shutil

    from pipelines import synthetic
    from pipelines.build import BuildOptions, build_dataset
    from pipelines.inspection import verify
    from pipelines.plan import ShardSize
    from pipelines.sources.librispeech import LibriSpeechSource

    spec = synthetic.make_librispeech(str(tmp_path / "c"), {"train-clean-100": 14, "dev-clean": 4}, seed=3)
    out = tmp_path / "d"
    build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100", "dev-clean")), Location(str(out)),
                  BuildOptions(ShardSize.parse("3"), 2, 0), workers=0, echo=lambda *_: None)
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["splits"]["train-clean-100"]["plan"] == "plan/train-clean-100.parquet"
    assert (out / "plan" / "dev-clean.parquet").exists() and verify(Location(str(out))).ok
    with_plan = SplitIndex.load(Location(str(out)), "train-clean-100")
    without = tmp_path / "older"
    shutil.copytree(out, without)
    for split in doc["splits"].values():
        del split["plan"], split["plan_sha256"]
    (without / "dataset.json").write_text(json.dumps(doc))
    shutil.rmtree(without / "plan")
    from_indexes = SplitIndex.load(Location(str(without)), "train-clean-100")
    assert with_plan.lengths.tolist() == from_indexes.lengths.tolist() and len(with_plan) == 14
    policy = BatchPolicy(max_tokens=200_000, min_sample_size=8_000, max_sample_size=64_000)
    assert _as_tuples(plan_epoch(with_plan, policy, 1, 0)) == _as_tuples(plan_epoch(from_indexes, policy, 1, 0))
    plan_file = out / "plan" / "train-clean-100.parquet"
    plan_file.write_bytes(plan_file.read_bytes()[:-9] + b"123456789")
    with pytest.raises(ValueError, match="plan/train-clean-100.parquet: sha256 differs from dataset.json"):
        SplitIndex.load(Location(str(out)), "train-clean-100")
    report = verify(Location(str(out)))
    assert not report.ok and report.broken == [("plan/train-clean-100.parquet", "sha256 differs from dataset.json")]
    # a plan file that disagrees with the index files, its sha256 recorded: caught by the comparison
    import pyarrow as pa

    from pipelines.shards import plan_column_bytes, sha256_hex
    from schemas.dataset import PLAN_COLUMN
    name = PLAN_COLUMN["speech"]
    changed = np.array(with_plan.lengths, dtype=np.int64)
    changed[0] += 320
    data = plan_column_bytes([pa.array(changed)], name)
    plan_file.write_bytes(data)
    doc = json.loads((out / "dataset.json").read_text())
    doc["splits"]["train-clean-100"]["plan_sha256"] = sha256_hex(data)
    (out / "dataset.json").write_text(json.dumps(doc))
    assert verify(Location(str(out))).broken == [
        ("plan/train-clean-100.parquet", f"its {name} column differs from the split's index files")]
