"""Corpora spread over disks: subset, speaker and class folders that are symbolic links are followed
(local disks; object stores have no links), giving the shards of the same corpus without links."""
from __future__ import annotations

import os
import shutil

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location

OPTIONS = BuildOptions(ShardSize.parse("4"), 1, 0)


def _build(source, out):
    return build_dataset(source, Location(str(out)), OPTIONS, workers=0, echo=lambda *_: None)


def test_librispeech_subsets_and_speakers_behind_symbolic_links(tmp_path):
    subsets = {"train-clean-100": 6, "dev-clean": 3}
    spec = synthetic.make_librispeech(str(tmp_path / "corpus"), subsets, seed=2, seconds=(1.0, 1.5))
    plain = _build(LibriSpeechSource(Location(spec.source), tuple(subsets)), tmp_path / "plain")
    # the subsets live on "other disks": the corpus folder holds links to them, one speaker linked too
    linked = tmp_path / "linked" / "LibriSpeech"
    linked.mkdir(parents=True)
    for subset in subsets:
        shutil.move(os.path.join(spec.source, subset), tmp_path / f"disk-{subset}")
        os.symlink(tmp_path / f"disk-{subset}", linked / subset)
    speaker = sorted((tmp_path / "disk-train-clean-100").iterdir())[0]
    shutil.move(speaker, tmp_path / "disk-speaker")
    os.symlink(tmp_path / "disk-speaker", speaker)
    os.symlink(linked, linked / "train-clean-100" / "loop")  # a link back up is not walked twice
    found = _build(LibriSpeechSource(Location(str(linked)), tuple(subsets)), tmp_path / "found")
    assert found.samples == plain.samples == sum(subsets.values())
    assert [s.sha256 for s in found.shards] == [s.sha256 for s in plain.shards]


def test_imagenet_class_folders_behind_symbolic_links(tmp_path):
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout="imagefolder", classes=3, train_per_class=3,
                                   val_per_class=1, seed=1)
    plain = _build(ImageNetSource(Location(spec.source), ("train", "val")), tmp_path / "plain")
    first = sorted((tmp_path / "corpus").rglob("train/*"))[0]
    shutil.move(first, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", first)
    found = _build(ImageNetSource(Location(spec.source), ("train", "val")), tmp_path / "found")
    assert found.classes == plain.classes and found.samples == plain.samples
    assert [s.sha256 for s in found.shards] == [s.sha256 for s in plain.shards]
