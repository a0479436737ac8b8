"""`d2v data ...`: build, inspect and verify datasets."""
from __future__ import annotations

import argparse
import json
import sys

from pipelines.plan import ShardSize
from pipelines.storage import Location

COMMON_HELP = "common options: --workers N | --scheduler ADDR, --shard-size, --mask-variants K, --seed N"


def add_parser(subparsers):
    """Adds `d2v data`; returns its sub-command group so other stages can add theirs (stream)."""
    data = subparsers.add_parser("data", help="build, inspect, verify and stream sharded datasets")
    commands = data.add_subparsers(dest="data_command", required=True)

    build = commands.add_parser("build", help="build WebDataset shards from a corpus", description=COMMON_HELP)
    sources = build.add_subparsers(dest="source", required=True)

    speech = sources.add_parser("librispeech", help="LibriSpeech FLAC + transcripts")
    speech.add_argument("src", help="folder (any fsspec URL) holding the subset folders, or its parent")
    speech.add_argument("out", help="output URL (local folder, s3://bucket/prefix, memory://...)")
    speech.add_argument("--subsets", required=True, help="comma-separated, e.g. train-clean-100,dev-clean")
    _speech_masks(speech)
    _common(speech)

    light = sources.add_parser("librilight", help="Libri-light recordings, cut into pieces at silences")
    light.add_argument("src", help="folder (any fsspec URL) holding SPEAKER/BOOK/*.flac (+ *.json voice activity)")
    light.add_argument("out", help="output URL of the dataset")
    light.add_argument("--max-seconds", type=float, default=30.0, help="longest piece cut from a recording")
    light.add_argument("--split", default="train", help="the split the pieces go to")
    _speech_masks(light)
    _common(light)

    fairseq = sources.add_parser("fairseq-manifest", help="fairseq manifests: {split}.tsv (+ .wrd/.ltr labels)")
    fairseq.add_argument("src", help="folder (any fsspec URL) holding the {split}.tsv files")
    fairseq.add_argument("out", help="output URL of the dataset")
    fairseq.add_argument("--splits", default="", help="comma-separated manifests to build (default: every .tsv)")
    _speech_masks(fairseq)
    _common(fairseq)

    table = sources.add_parser("manifest", help="a table (CSV/TSV/Parquet/JSON lines) naming audio or image files")
    table.add_argument("table", help="the table file (any fsspec URL); relative paths in it start at its folder")
    table.add_argument("out", help="output URL of the dataset")
    table.add_argument("--modality", choices=["speech", "vision", "text"], required=True, help="what the files hold")
    table.add_argument("--path-column", default="path", help="the file of each row (default: path)")
    table.add_argument("--id-column", default=None, help="sample keys (default: file names without suffix)")
    table.add_argument("--split-column", default=None, help="each row's split (default: --default-split)")
    table.add_argument("--default-split", default="train", help="split of rows without a split column")
    table.add_argument("--transcript-column", default=None, help="speech: the transcript")
    table.add_argument("--speaker-column", default=None, help="speech: the speaker")
    table.add_argument("--label-column", default=None, help="vision: class names (sorted into label indexes)")
    table.add_argument("--mask-prob", type=float, default=None,
                       help="speech: share of frames that start a masked span (0.65); text: of tokens masked (0.15)")
    table.add_argument("--mask-length", type=int, default=10, help="speech: frames per masked span")
    _image_options(table)
    _text_options(table)
    _common(table)

    vision = sources.add_parser("imagenet", help="ImageNet (ILSVRC CLS-LOC or ImageFolder)")
    vision.add_argument("src", help="folder holding ILSVRC/ and the LOC_* files, or an ImageFolder root")
    vision.add_argument("out", help="output URL of the dataset")
    vision.add_argument("--splits", default="train,val", help="comma-separated split folders to build")
    _image_options(vision)
    _common(vision)

    text = sources.add_parser("text", help="raw UTF-8 text (one paragraph per line, blank line between documents)")
    text.add_argument("paths", nargs="+", metavar="FILE... OUT", help="input files (any fsspec URL), then the output URL")
    text.add_argument("--mask-prob", type=float, default=0.15, help="share of tokens masked")
    _text_options(text)
    _common(text)

    inspect = commands.add_parser("inspect", help="summarise a built dataset")
    inspect.add_argument("url", help="the dataset (folder holding dataset.json)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    verify = commands.add_parser("verify", help="re-read every shard and check it against dataset.json")
    verify.add_argument("url", help="the dataset (folder holding dataset.json)")
    verify.add_argument("--repair", action="store_true",
                        help="first abort the unfinished multipart uploads a killed build left under URL (S3)")

    export = commands.add_parser("export-manifest", help="write fairseq manifests (and the audio) of a speech dataset")
    export.add_argument("url", help="the dataset (folder holding dataset.json)")
    export.add_argument("out", help="folder (any fsspec URL) for {split}.tsv/.wrd/.ltr and audio/")
    export.add_argument("--storage-options", default=None, help="JSON of fsspec options for URL and OUT")
    return commands


def _image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize-shorter", type=int, default=None,
                        help="images: downscale so the shorter side is at most N pixels (stored as JPEG)")
    parser.add_argument("--mask-kind", choices=["block", "inverse_block"], default="block",
                        help="images: block: BEiT (data2vec); inverse_block: data2vec 2.0")
    parser.add_argument("--image-size", type=int, default=224, help="images: training crop side the masks refer to")
    parser.add_argument("--patch-size", type=int, default=16, help="images: patch side of the model (masks are per patch)")


def _text_options(parser: argparse.ArgumentParser) -> None:
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=int, default=None, help="text: train a byte-level BPE of this size")
    vocab.add_argument("--tokenizer", default=None, help="text: folder with vocab.json + merges.txt (or tokenizer.json)")
    parser.add_argument("--block-size", type=int, default=512, help="text: tokens per sample, <s> and </s> included")
    parser.add_argument("--valid-fraction", type=float, default=0.01,
                        help="text: share of documents held out as the valid split")
    parser.add_argument("--mask-span", type=int, default=1, help="text: 1: BERT masking; >1: spans of this many tokens")


def _speech_masks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask-prob", type=float, default=0.65, help="share of frames that start a masked span")
    parser.add_argument("--mask-length", type=int, default=10, help="frames per masked span")


def _common(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="local Dask cluster size (default: CPU count; 0 = run in this process)")
    where.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--shard-size", default="256MB", help="bytes of source data (256MB) or samples (1000) per shard")
    parser.add_argument("--mask-variants", type=int, default=4, help="independent mask variants stored per sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shard order and the stored masks")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset of other inputs or parameters at OUT, its shards included")
    parser.add_argument("--storage-options", default=None,
                        help="JSON of fsspec options for SRC and OUT (credentials belong in the environment)")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "build":
        return _build(args)
    if args.data_command == "inspect":
        from pipelines.inspection import format_summary, read_dataset, summary

        location = Location(args.url)
        dataset, _, _ = read_dataset(location)
        info = summary(dataset, location.public_url())
        print(json.dumps(info, indent=2) if args.json else format_summary(info))
        return 0
    if args.data_command == "verify":
        from pipelines.inspection import verify

        if args.repair:
            from pipelines.storage import abort_orphaned_uploads

            fs, root = Location(args.url).filesystem()
            aborted = abort_orphaned_uploads(fs, root)
            print(f"repair: aborted {len(aborted)} unfinished upload(s)" + (f": {', '.join(aborted)}" if aborted else ""))
        report = verify(Location(args.url))
        if not report.ok:
            for shard, problem in report.broken:
                print(f"BROKEN {shard}: {problem}", file=sys.stderr)
            print(f"{len(report.broken)} of {report.shards} shards broken; {report.samples} samples in the intact ones",
                  file=sys.stderr)
            return 1
        print(f"OK: {report.shards} shards, {report.samples} samples verified")
        return 0
    if args.data_command == "export-manifest":
        from pipelines.sources.fairseq import export_manifest

        options = json.loads(args.storage_options) if args.storage_options else {}
        export_manifest(Location(args.url, options), Location(args.out, options))
        return 0
    raise AssertionError(args.data_command)


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names (subsets, splits)."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _text_settings(args: argparse.Namespace) -> dict:
    return {"vocab_size": args.vocab_size, "tokenizer_dir": args.tokenizer, "block_size": args.block_size,
            "valid_fraction": args.valid_fraction, "mask_span": args.mask_span, "seed": args.seed}


def _build(args: argparse.Namespace) -> int:
    from pipelines.build import BuildOptions, build_dataset
    from pipelines.sources.registry import make_source

    options = json.loads(args.storage_options) if args.storage_options else {}
    build_options = BuildOptions(ShardSize.parse(args.shard_size), args.mask_variants, args.seed,
                                 overwrite=args.overwrite)
    if args.source == "librispeech":
        inputs, out = [args.src], args.out
        settings = {"subsets": _names(args.subsets), "mask_prob": args.mask_prob, "mask_length": args.mask_length}
    elif args.source == "librilight":
        inputs, out = [args.src], args.out
        settings = {"split": args.split, "max_seconds": args.max_seconds, "mask_prob": args.mask_prob,
                    "mask_length": args.mask_length}
    elif args.source == "fairseq-manifest":
        inputs, out = [args.src], args.out
        settings = {"splits": _names(args.splits), "mask_prob": args.mask_prob, "mask_length": args.mask_length}
    elif args.source == "manifest":
        from pipelines.sources.manifest import TableColumns

        inputs, out = [args.table], args.out
        columns = TableColumns(path=args.path_column, id=args.id_column, split=args.split_column,
                               transcript=args.transcript_column, speaker=args.speaker_column, label=args.label_column,
                               default_split=args.default_split)
        settings = {"modality": args.modality, "columns": columns}
        if args.modality == "speech":
            settings.update(mask_prob=0.65 if args.mask_prob is None else args.mask_prob, mask_length=args.mask_length)
        elif args.modality == "text":
            settings.update(mask_prob=0.15 if args.mask_prob is None else args.mask_prob, **_text_settings(args))
        else:
            settings.update(resize_shorter=args.resize_shorter, mask_kind=args.mask_kind, image_size=args.image_size,
                            patch_size=args.patch_size)
    elif args.source == "imagenet":
        inputs, out = [args.src], args.out
        settings = {"splits": _names(args.splits), "resize_shorter": args.resize_shorter, "mask_kind": args.mask_kind,
                    "image_size": args.image_size, "patch_size": args.patch_size}
    else:
        if len(args.paths) < 2:
            raise ValueError("d2v data build text: give at least one input FILE and then OUT")
        *inputs, out = args.paths
        settings = {"mask_prob": args.mask_prob, **_text_settings(args)}
    source = make_source(args.source, [Location(i, options) for i in inputs], **settings)
    build_dataset(source, Location(out, options), build_options, workers=args.workers, scheduler=args.scheduler)
    return 0
