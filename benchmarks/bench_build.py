"""Shard build throughput per modality, and scaling from 1 to 2 Dask workers.

Generates corpora of realistic item sizes (5-15 s utterances, ~400x350 JPEGs, long text
documents) cut into about two dozen shards each, then builds each on a local Dask cluster of 1 worker (the baseline) and of 2 workers,
in the same run. Build time is measured on a started cluster (start-up excluded), scan included.

    .venv/bin/python benchmarks/bench_build.py [--utterances 480] [--images 1600] [--repeats 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import synthetic  # noqa: E402
from pipelines.build import BuildOptions, build_with_runner  # noqa: E402
from pipelines.cluster import runner  # noqa: E402
from pipelines.plan import ShardSize  # noqa: E402
from pipelines.storage import Location  # noqa: E402


def _sources(root: Path, args):
    from pipelines.sources.imagenet import ImageNetSource
    from pipelines.sources.librispeech import LibriSpeechSource
    from pipelines.sources.text import TextSource

    speech = synthetic.make_librispeech(str(root / "speech"), {"train-clean-100": args.utterances}, seed=0,
                                        seconds=(5.0, 15.0), speakers=4, chapters_per_speaker=4)
    vision = synthetic.make_imagenet(str(root / "vision"), classes=8, train_per_class=args.images // 8,
                                     val_per_class=0, size_range=(330, 500), seed=0)
    text = synthetic.make_text_corpus(str(root / "text"), files=4, docs_per_file=args.documents, seed=0,
                                      paragraphs=(4, 12), words_per_paragraph=(40, 120))
    return {
        "speech": (LibriSpeechSource(Location(speech.source), ("train-clean-100",)), "20"),
        "vision": (ImageNetSource(Location(vision.source), ("train",)), "64"),
        "text": (TextSource.create(tuple(Location(f) for f in text.files), vocab_size=8000, seed=0), "100"),
    }


def _measure(source, shard_size: str, workers: int, out: Path, repeats: int) -> dict:
    """Best of `repeats` clean builds on one started cluster (the machine's other load only slows a run)."""
    times, shard_times = [], []
    with runner(workers=workers) as run:
        for _ in range(repeats):
            phases: dict = {}
            started = time.perf_counter()
            dataset = build_with_runner(source, Location(str(out)), BuildOptions(ShardSize.parse(shard_size), 4, 0),
                                        run, echo=lambda *_: None, timings=phases)
            times.append(time.perf_counter() - started)
            shard_times.append(phases["shards"])
            shutil.rmtree(out)
    seconds = min(times)
    audio = sum(s.seconds or 0 for s in dataset.splits.values())
    tokens = sum(s.tokens or 0 for s in dataset.splits.values())
    return {"workers": workers, "seconds": round(seconds, 3), "shard_phase_seconds": round(min(shard_times), 3), "samples": dataset.samples, "shards": len(dataset.shards),
            "samples_per_s": round(dataset.samples / seconds, 1),
            "audio_hours_per_hour": round(audio / seconds, 1) if audio else None,
            "tokens_per_s": round(tokens / seconds) if tokens else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=480)
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--documents", type=int, default=150, help="documents per text file (4 files)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modalities", default="speech,vision,text")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "modalities": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = _sources(root, args)
        for name in args.modalities.split(","):
            source, shard_size = sources[name]
            one = _measure(source, shard_size, 1, root / f"{name}-1", args.repeats)
            two = _measure(source, shard_size, 2, root / f"{name}-2", args.repeats)
            results["modalities"][name] = {
                "1 worker": one, "2 workers": two, "scaling": round(one["seconds"] / two["seconds"], 2),
                "shard_phase_scaling": round(one["shard_phase_seconds"] / two["shard_phase_seconds"], 2)}
    print(f"machine: {results['machine']}")
    print(f"{'modality':<8} {'workers':>7} {'samples':>8} {'shards':>6} {'seconds':>8} {'samples/s':>10} "
          f"{'audio-h/h':>10} {'tokens/s':>10} {'scaling':>8} {'shards-s':>9} {'scaling':>8}")
    for name, entry in results["modalities"].items():
        for key in ("1 worker", "2 workers"):
            r = entry[key]
            print(f"{name:<8} {r['workers']:>7} {r['samples']:>8} {r['shards']:>6} {r['seconds']:>8.2f} "
                  f"{r['samples_per_s']:>10.1f} {r['audio_hours_per_hour'] or '':>10} {r['tokens_per_s'] or '':>10} "
                  f"{entry['scaling'] if key == '2 workers' else '':>8} {r['shard_phase_seconds']:>9.2f} "
                  f"{entry['shard_phase_scaling'] if key == '2 workers' else '':>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
