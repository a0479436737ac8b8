"""ImageNet shards: both layouts, labels from sorted wnids, RGB JPEG normalisation, faults."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.storage import Location
from tests.helpers import load_npy, tar_members


def _build(source_root: str, out, **source_options):
    return build_dataset(
        ImageNetSource(Location(source_root), ("train", "val"), **source_options), Location(str(out)),
        BuildOptions(ShardSize.parse("5"), mask_variants=2, seed=1), workers=0, echo=lambda *_: None,
    )


@pytest.mark.parametrize("layout", ["ilsvrc", "imagefolder"])
def test_counts_labels_and_normalised_jpegs(layout, tmp_path):
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout=layout, classes=3, seed=5, faults=True)
    out = tmp_path / "out"
    dataset = _build(spec.source, out)
    expected = spec.expected
    assert dataset.source_items == expected["items"] == dataset.samples + dataset.rejected
    assert dataset.rejects_by_reason == expected["rejects_by_reason"]
    assert dataset.counts.get("converted", 0) == expected["converted"]
    assert dataset.classes == expected["classes"] == sorted(expected["classes"])
    assert {name: s.samples for name, s in dataset.splits.items()} == expected["splits"]
    for shard in dataset.shards:
        members = tar_members(out / shard.name)
        for row in pq.read_table(out / shard.index, use_threads=False).to_pylist():
            image = Image.open(io.BytesIO(members[f"{row['key']}.jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (row["width"], row["height"])
            meta = json.loads(members[f"{row['key']}.json"])
            assert dataset.classes[meta["label"]] == meta["wnid"] == row["wnid"]
            mask = load_npy(members[f"{row['key']}.mask.npy"])
            assert mask.shape == (2, 196) and mask.dtype == np.bool_
            assert (100 <= mask.sum(axis=1)).all() and (mask.sum(axis=1) <= 120).all()


def test_ilsvrc_val_labels_come_from_the_solution_csv(tmp_path):
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout="ilsvrc", classes=4, val_per_class=3, seed=2)
    out = tmp_path / "out"
    dataset = _build(spec.source, out)
    solution = (tmp_path / "corpus" / "LOC_val_solution.csv").read_text().splitlines()[1:]
    truth = {line.split(",")[0]: line.split(",")[1].split()[0] for line in solution}
    seen = 0
    for shard in dataset.shards_of("val"):
        for row in pq.read_table(out / shard.index, use_threads=False).to_pylist():
            assert row["wnid"] == truth[row["key"]]
            assert row["label"] == dataset.classes.index(truth[row["key"]])
            seen += 1
    assert seen == len(truth)


def test_resize_shorter_side_and_inverse_block_masks(tmp_path):
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout="imagefolder", size_range=(60, 90), seed=4)
    out = tmp_path / "out"
    dataset = _build(spec.source, out, resize_shorter=32, mask_kind="inverse_block")
    assert dataset.counts["resized"] == dataset.samples
    assert dataset.mask.kind == "inverse_block"
    for shard in dataset.shards:
        members = tar_members(out / shard.name)
        for row in pq.read_table(out / shard.index, use_threads=False).to_pylist():
            assert min(row["width"], row["height"]) == 32
            assert Image.open(io.BytesIO(members[f"{row['key']}.jpg"])).size == (row["width"], row["height"])
            assert (load_npy(members[f"{row['key']}.mask.npy"]).sum(axis=1) == 157).all()


def test_a_folder_that_is_no_imagenet_is_a_clear_error(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(OSError, match="neither"):
        _build(str(tmp_path / "nothing"), tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_memory_urls_work_in_process_and_are_refused_across_processes(tmp_path):
    import uuid

    from pipelines.inspection import read_dataset, verify

    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout="imagefolder", seed=6, faults=True)
    url = f"memory://d2v-test-{uuid.uuid4().hex}/imagenet"
    dataset = build_dataset(ImageNetSource(Location(spec.source)), Location(url), BuildOptions(ShardSize.parse("5"), 1, 0),
                            workers=0, echo=lambda *_: None)
    assert read_dataset(Location(url))[0].model_dump(mode="json") == dataset.model_dump(mode="json")
    assert verify(Location(url)).ok
    with pytest.raises(ValueError, match="--workers 0"):
        build_dataset(ImageNetSource(Location(spec.source)), Location(url), workers=2)


def test_an_unlabeled_split_folder_builds_its_pictures_without_labels(tmp_path):
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout="imagefolder", classes=3, seed=4, faults=True,
                                   unlabelled=5, learnable="words")
    out = tmp_path / "out"
    dataset = build_dataset(ImageNetSource(Location(spec.source), ("unlabeled", "train", "val")), Location(str(out)),
                            BuildOptions(ShardSize.parse("5"), mask_variants=1, seed=1), workers=0,
                            echo=lambda *_: None)
    assert dataset.source_items == spec.expected["items"] == dataset.samples + dataset.rejected
    assert {name: s.samples for name, s in dataset.splits.items()} == spec.expected["splits"]
    assert dataset.splits["unlabeled"].samples == 5 and dataset.classes == spec.expected["classes"]
    labels = {}
    for shard in dataset.shards:
        for row in pq.read_table(out / shard.index, use_threads=False).to_pylist():
            labels.setdefault(shard.split, set()).add((row["label"], row["wnid"]) if shard.split == "unlabeled"
                                                      else row["label"] >= 0)
    assert labels == {"unlabeled": {(-1, "")}, "train": {True}, "val": {True}}


def test_split_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--splits: expected split folder names"):
        ImageNetSource(Location(str(tmp_path)), ("train", "../elsewhere"))
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout="ilsvrc", classes=2, seed=1)
    with pytest.raises(ValueError, match="--splits unlabeled: the ILSVRC layout has train and val only"):
        build_dataset(ImageNetSource(Location(spec.source), ("train", "unlabeled")), Location(str(tmp_path / "out")),
                      BuildOptions(ShardSize.parse("5"), mask_variants=1, seed=1), workers=0, echo=lambda *_: None)
