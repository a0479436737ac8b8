"""`d2v data stream`: run the loader without a model, for users checking data and operators checking speed."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.storage import Location


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", nargs="?", help="dataset URL (the folder holding dataset.json); not with --mix")
    parser.add_argument("--split", default=None,
                        help="the split to stream; comma-separated for several streamed as one (a,b,c)")
    parser.add_argument("--mix", default=None, metavar="YAML",
                        help="a file listing datasets to mix, like the trainer's data.sources: "
                             "- {url: ..., split: train, weight: 0.7} (or repeat: 2)")
    parser.add_argument("--rank", type=int, default=0, help="stream this rank's share")
    parser.add_argument("--world-size", type=int, default=1, help="of this many ranks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the epoch plan")
    parser.add_argument("--epochs", type=int, default=1, help="epochs to stream")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=int, default=None, help="images/text (default 32)")
    size.add_argument("--max-tokens", type=int, default=None, help="speech: audio samples per batch (default 1,400,000)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many batches of this rank")
    parser.add_argument("--state-out", default=None, help="write the loader state here when stopping")
    parser.add_argument("--resume", default=None, help="a state file written by --state-out")
    parser.add_argument("--keys-out", default=None, help="write the consumed sample keys here, one per line")
    parser.add_argument("--workers", type=int, default=4, help="batches decoded in parallel (threads)")
    parser.add_argument("--io-threads", type=int, default=8, help="concurrent range reads")
    parser.add_argument("--eval", action="store_true", help="evaluation order and transforms: no shuffle, no crops")
    parser.add_argument("--tail", choices=["drop", "pad"], default="drop", help="batches that do not fill every rank: dropped, or padded by repeats")
    parser.add_argument("--cache-dir", default=None, help="local cache of whole shards, keyed by sha256")
    parser.add_argument("--skip-bad-shards", action="store_true", help="skip (and count) unreadable shards and samples instead of stopping")
    parser.add_argument("--report-every", type=float, default=5.0, help="seconds between progress lines")


def run(args: argparse.Namespace) -> int:
    from d2v_train.data.loader import StreamingLoader
    from d2v_train.data.modalities import MODALITIES
    from pipelines.inspection import read_dataset

    mix = _mix(args)
    location = Location(mix[0].url if mix else args.url)
    dataset, _, _ = read_dataset(location)
    policy = MODALITIES[dataset.modality].stream_policy(max_tokens=args.max_tokens, batch_size=args.batch_size,
                                                        train=not args.eval, tail=args.tail)
    loader = StreamingLoader(location, args.split, policy, mix=mix, rank=args.rank, world_size=args.world_size,
                             seed=args.seed, train=not args.eval, workers=args.workers, io_threads=args.io_threads,
                             cache_dir=args.cache_dir, skip_bad_shards=args.skip_bad_shards)
    if args.resume:
        loader.load_state_dict(json.loads(Path(args.resume).read_text()))
    keys_file = open(args.keys_out, "w") if args.keys_out else None
    batches = 0
    last_report = time.monotonic()
    try:
        while loader.epoch < args.epochs and (args.max_batches is None or batches < args.max_batches):
            for batch in loader:
                batches += 1
                if keys_file:
                    keys_file.writelines(f"{key}\n" for key in batch["keys"])
                if time.monotonic() - last_report >= args.report_every:
                    print(_progress(loader, batches), flush=True)
                    last_report = time.monotonic()
                if args.max_batches is not None and batches >= args.max_batches:
                    break
    finally:
        if keys_file:
            keys_file.close()
        loader.close()
    if args.state_out:
        Path(args.state_out).write_text(json.dumps(loader.state_dict()) + "\n")
    print(_progress(loader, batches, final=True), flush=True)
    return 0


def _mix(args: argparse.Namespace):
    """The parts of a mix from --mix or a comma-separated --split; None for one split."""
    from pydantic import ValidationError

    from d2v_train.config import DataConfig, describe

    if args.mix:
        if args.url or args.split:
            raise ValueError("--mix names every dataset and split: leave out URL and --split")
        import yaml

        sources = yaml.safe_load(Path(args.mix).read_text())
        settings = {"sources": sources}
    else:
        if not args.url or not args.split:
            raise ValueError("give the dataset URL and --split (or --mix FILE)")
        splits = [s.strip() for s in args.split.split(",") if s.strip()]
        if len(splits) == 1:
            return None
        settings = {"url": args.url, "splits": splits}
    try:  # the trainer's own checks, so the two name a wrong source alike
        return DataConfig(batch_size=1, **settings).mix()
    except ValidationError as exc:
        raise ValueError(describe(exc).replace("sources", "--mix").replace("splits", "--split")) from None


def _progress(loader, batches: int, final: bool = False) -> str:
    rates = loader.throughput.rates()
    parts = [f"{'done' if final else 'streaming'}: epoch {loader.epoch} batches {batches}",
             f"samples {loader.throughput.samples}", f"{rates['samples_per_s']:.1f} samples/s"]
    if loader.throughput.audio_seconds:
        parts.append(f"{rates['audio_s_per_s']:.0f} audio-s/s")
    if loader.throughput.tokens:
        parts.append(f"{rates['tokens_per_s']:.0f} tokens/s")
    names = getattr(loader.index, "names", None)
    if names:
        parts.append("per source " + " ".join(f"{name}={loader.throughput.by_source.get(n, 0)}"
                                              for n, name in enumerate(names)))
    stats = loader.reader.stats
    parts.append(f"requests {stats.requests} retries {stats.retries} skipped shards {stats.skipped_shards}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2v data stream")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
