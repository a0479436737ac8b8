"""The generated corpora the loader benchmarks share, built into d2v shards in-process.

Speech: LibriSpeech layout, 5-15 s utterances, 100 per shard. Images: ImageNet layout, 8 classes
of 400-500 px JPEGs, 128 per shard. Returns the generator's spec (its files) and the dataset folder.
"""
from __future__ import annotations

from pathlib import Path

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location

SPEECH_SPLIT = "train-clean-100"


def speech_corpus(root: Path, utterances: int):
    spec = synthetic.make_librispeech(str(root / "speech-src"), {SPEECH_SPLIT: utterances}, seed=0,
                                      seconds=(5.0, 15.0), speakers=4, chapters_per_speaker=4)
    data = root / "speech"
    build_dataset(LibriSpeechSource(Location(spec.source), (SPEECH_SPLIT,)), Location(str(data)),
                  BuildOptions(ShardSize.parse("100"), 4, 0), workers=0, echo=lambda *_: None)
    return spec, data


def image_corpus(root: Path, images: int):
    spec = synthetic.make_imagenet(str(root / "images-src"), classes=8, train_per_class=images // 8,
                                   val_per_class=0, size_range=(400, 500), seed=0)
    data = root / "images"
    build_dataset(ImageNetSource(Location(spec.source), ("train",)), Location(str(data)),
                  BuildOptions(ShardSize.parse("128"), 4, 0), workers=0, echo=lambda *_: None)
    return spec, data
