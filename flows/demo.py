"""`d2v demo MODALITY`: a small generated corpus in the real layout, built into shards.

The full road (pre-training, evaluation, the Prefect flow) joins this command as those stages
land; today it runs the data stage and prints `d2v data inspect` of the result.
"""
from __future__ import annotations

import os

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.inspection import format_summary, read_dataset, summary
from pipelines.plan import ShardSize
from pipelines.storage import Location


def run_demo(modality: str, out: str, *, workers: int = 2) -> int:
    corpus = os.path.join(out, "corpus", modality)
    dataset_url = os.path.join(out, "datasets", modality)
    options = BuildOptions(shard_size=ShardSize.parse("4MB"), mask_variants=4, seed=0)
    if modality == "speech":
        from pipelines.sources.librispeech import LibriSpeechSource

        spec = synthetic.make_librispeech(corpus, {"train-clean-100": 48, "dev-clean": 12}, seed=0, faults=True)
        source = LibriSpeechSource(Location(spec.source), ("train-clean-100", "dev-clean"))
    elif modality == "vision":
        from pipelines.sources.imagenet import ImageNetSource

        spec = synthetic.make_imagenet(corpus, classes=4, train_per_class=12, val_per_class=4, seed=0, faults=True)
        source = ImageNetSource(Location(spec.source), ("train", "val"))
    else:
        from pipelines.sources.text import TextSource

        spec = synthetic.make_text_corpus(corpus, files=2, docs_per_file=20, seed=0, faults=True)
        source = TextSource.create(tuple(Location(f) for f in spec.files), vocab_size=1000, seed=0)
    print(f"generated a {modality} corpus at {spec.source} (with one item of each known fault)")
    build_dataset(source, Location(dataset_url), options, workers=workers)
    location = Location(dataset_url)
    dataset, _, _ = read_dataset(location)
    print()
    print(format_summary(summary(dataset, location.public_url())))
    print(f"\nshards, indexes and dataset.json are under {os.path.abspath(dataset_url)}")
    return 0
