"""The `d2v` command: one entry point, each stage's commands imported only when used."""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v", description="data2vec pre-training factory")
    subparsers = parser.add_subparsers(dest="command", required=True)
    from pipelines import cli as data_cli

    data_commands = data_cli.add_parser(subparsers)
    stream = data_commands.add_parser("stream", help="run the streaming loader without a model (throughput, keys, state)")
    from d2v_train.data.cli import add_arguments as add_stream_arguments

    add_stream_arguments(stream)
    demo = subparsers.add_parser("demo", help="generate a small corpus in the real layout and run the pipeline on it")
    demo.add_argument("modality", choices=["speech", "vision", "text"])
    demo.add_argument("--out", default="demo", help="folder (or URL) for the corpus and the outputs (default: ./demo)")
    demo.add_argument("--workers", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data" and args.data_command == "stream":
            from d2v_train.data import cli as stream_cli

            return stream_cli.run(args)
        if args.command == "data":
            from pipelines import cli as data_cli

            return data_cli.run(args)
        if args.command == "demo":
            from flows.demo import run_demo

            return run_demo(args.modality, args.out, workers=args.workers)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ConnectionError, KeyError) as exc:
        # Errors a user can cause (bad input, unreachable storage, wrong config): one clear line.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
