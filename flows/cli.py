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
    export = subparsers.add_parser("export-hf", help="write a checkpoint's encoder as an HF transformers model folder")
    export.add_argument("checkpoint", help="a checkpoint folder/URL, or a run's checkpoint folder (newest complete one)")
    export.add_argument("out_dir", help="folder for config.json and model.safetensors")
    export.add_argument("--remote-code", action="store_true",
                        help="write the encoder with its own modeling file (trust_remote_code) even where an HF class "
                             "could hold it; data2vec 2.0 encoders are always written so")
    imports = subparsers.add_parser("import", help="released weights (HF folder, fairseq .pt) as a d2v checkpoint")
    kinds = imports.add_subparsers(dest="import_kind", required=True)
    hf = kinds.add_parser("hf", help="an HF Data2Vec{Audio,Vision,Text} model folder")
    hf.add_argument("src", help="the folder (any fsspec URL) with config.json and model.safetensors")
    hf.add_argument("out", help="the d2v checkpoint folder to write")
    fairseq = kinds.add_parser("fairseq", help="a fairseq data2vec audio checkpoint (.pt, loaded weights-only)")
    fairseq.add_argument("src", help="the .pt file (any fsspec URL)")
    fairseq.add_argument("out", help="the d2v checkpoint folder to write")
    fairseq.add_argument("--heads", type=int, default=None,
                         help="attention heads (default: the file's cfg, else width / 64)")
    lm = subparsers.add_parser("lm", help="word n-gram language models for CTC decoding")
    lm_commands = lm.add_subparsers(dest="lm_command", required=True)
    lm_build = lm_commands.add_parser("build", help="estimate an ARPA n-gram LM from a text file (one sentence a line)")
    lm_build.add_argument("text", help="the text file (any fsspec URL)")
    lm_build.add_argument("out", help="the ARPA file to write (OUT.arpa)")
    lm_build.add_argument("--order", type=int, default=4, help="n of the n-grams (default 4)")
    encode = subparsers.add_parser("encode", help="representations of audio, image or text files")
    encode.add_argument("checkpoint", help="a checkpoint folder/URL, or a run's checkpoint folder (newest complete one)")
    encode.add_argument("inputs", nargs="+", metavar="INPUT", help="audio, image or text files (URLs) to encode")
    encode.add_argument("--out", required=True, help="FILE.npy: (T, D) for one input; (N, T_max, D) zero-padded "
                        "for several, with their lengths in FILE.lengths.npy")
    encode.add_argument("--layer", type=int, default=None, help="output of block N (1..layers); default: the final output")
    from d2v_train.eval.cli import add_parser as add_eval_parser

    add_eval_parser(subparsers)
    launch = subparsers.add_parser("launch", help="start pre-training on a cluster")
    launchers = launch.add_subparsers(dest="launcher", required=True)
    slurm = launchers.add_parser("slurm", help="write (--submit: and submit) an sbatch script: torchrun on every node, "
                                 "c10d rendezvous, requeued after a pre-emption's save")
    slurm.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the trainer's settings, as for main.py")
    slurm.add_argument("--nodes", type=int, required=True, help="machines (one torchrun each)")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node (one per GPU)")
    slurm.add_argument("--config", default=None, help="the trainer's YAML config (checked here before writing)")
    slurm.add_argument("--job-name", default="d2v", help="the job's name in the queue (default d2v)")
    slurm.add_argument("--partition", default=None, help="the partition (queue) to run in")
    slurm.add_argument("--account", default=None, help="the account charged")
    slurm.add_argument("--time", default=None, help="the job's time limit (HH:MM:SS or D-HH:MM:SS)")
    slurm.add_argument("--cpus-per-node", type=int, default=None, help="CPUs of each node's task (the loaders need some)")
    slurm.add_argument("--port", type=int, default=29500, help="the rendezvous port on the first node")
    slurm.add_argument("--grace", type=int, default=180, help="seconds before the time limit when the trainer is "
                       "told to save (SIGTERM) and the job requeues (default 180)")
    slurm.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                       help="another #SBATCH line, e.g. --sbatch-option=--exclusive (repeatable)")
    slurm.add_argument("--python", default=sys.executable, help="the Python on the nodes (default: this one)")
    slurm.add_argument("--script", default="d2v-train.sbatch", help="where to write the script")
    what = slurm.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    what.add_argument("--submit", action="store_true", help="write it and submit it with sbatch")
    slurm.add_argument("--wait", action="store_true", help="with --submit: wait for the job; exit with its code")
    demo = subparsers.add_parser("demo", help="generate a small corpus in the real layout and run the pipeline on it")
    demo.add_argument("modality", choices=["speech", "vision", "text"], help="which demo to run")
    demo.add_argument("--out", default="demo", help="folder (or URL) for the corpus and the outputs (default: ./demo)")
    demo.add_argument("--workers", type=int, default=2, help="Dask workers of the shard build")
    demo.add_argument("--variant", choices=["data2vec", "data2vec2"], default="data2vec",
                      help="data2vec2: the data2vec 2.0 efficiency mode's tiny presets")
    serve = subparsers.add_parser("serve", help="serve the Prefect deployments pretrain/speech, pretrain/vision, "
                                  "pretrain/text (PREFECT_API_URL names the server)")
    serve.add_argument("--modalities", default="speech,vision,text", help="comma-separated subset to serve")
    serve.add_argument("--limit", type=int, default=None, help="flow runs executed at the same time (default: no limit)")
    return parser


def main(argv: list[str] | None = None, *, exit_after_eval: bool = False) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (args.command == "eval" and args.eval_task == "curve"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")  # only the curve passes options on
    from pipelines.cli_errors import exit_code

    return exit_code(lambda: _run(args, extra, exit_after_eval))


def _run(args, extra: list[str], exit_after_eval: bool) -> int:
    if args.command == "data" and args.data_command == "stream":
        from d2v_train.data import cli as stream_cli

        return stream_cli.run(args)
    if args.command == "data":
        from pipelines import cli as data_cli

        return data_cli.run(args)
    if args.command == "eval":
        from d2v_train.eval.cli import run_and_exit

        return run_and_exit(args, extra, exit_after_eval=exit_after_eval)
    if args.command == "export-hf":
        from d2v_train.export import export_hf

        print(f"wrote {export_hf(args.checkpoint, args.out_dir, remote_code=args.remote_code)}")
        return 0
    if args.command == "encode":
        return _encode(args)
    if args.command == "lm":
        from d2v_train.eval.lm import build_lm

        counts = build_lm(args.text, args.out, args.order)
        print(f"wrote {args.out}: " + ", ".join(f"{n}-grams {c}" for n, c in counts.items()))
        return 0
    if args.command == "import":
        from d2v_train.imports import import_fairseq, import_hf

        folder = import_hf(args.src, args.out) if args.import_kind == "hf" else \
            import_fairseq(args.src, args.out, heads=args.heads)
        print(f"wrote {folder}")
        return 0
    if args.command == "launch":
        return _launch_slurm(args)
    if args.command == "demo":
        from flows.demo import run_demo

        _exit_cleanly_on_sigterm()  # the temporary Prefect server and the Dask cluster end with the demo
        return run_demo(args.modality, args.out, workers=args.workers, variant=args.variant)
    if args.command == "serve":
        from flows.serve import MODALITIES, serve

        chosen = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        unknown = sorted(set(chosen) - set(MODALITIES))
        if unknown or not chosen:
            raise ValueError(f"--modalities: choose from {', '.join(MODALITIES)} (got {args.modalities!r})")
        serve(chosen, limit=args.limit)
        return 0
    raise AssertionError(args.command)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`, a closing terminal) raises SystemExit instead of ending the
    process on the spot, so that context managers and atexit handlers stop the children this
    process started (Prefect's temporary server, the local Dask cluster) instead of orphaning them."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _launch_slurm(args) -> int:
    import subprocess
    from pathlib import Path

    from d2v_train.config import load_train_config
    from d2v_train.slurm import SlurmJob, sbatch_script

    load_train_config(args.config, args.overrides)  # a wrong setting fails here, naming the field
    if args.wait and not args.submit:
        raise ValueError("--wait: only with --submit")
    trainer_args = ([f"--config={args.config}"] if args.config else []) + args.overrides
    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, trainer_args=trainer_args,
                   job_name=args.job_name, partition=args.partition, account=args.account, time=args.time,
                   cpus_per_node=args.cpus_per_node, port=args.port, grace_s=args.grace, python=args.python,
                   sbatch_options=args.sbatch_option)
    script = sbatch_script(job)
    if args.dry_run:
        print(script, end="")
        return 0
    Path(args.script).parent.mkdir(parents=True, exist_ok=True)
    Path(args.script).write_text(script)
    print(f"wrote {args.script}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s)", flush=True)
    if not args.submit:
        return 0
    return subprocess.run(["sbatch", *(["--wait"] if args.wait else []), args.script]).returncode


def _encode(args) -> int:
    import numpy as np

    from d2v_train.export import encode
    from pipelines.storage import check_output

    check_output(args.out, "--out")
    outputs = encode(args.checkpoint, args.inputs, layer=args.layer)
    if len(outputs) == 1:
        np.save(args.out, outputs[0])
    else:
        lengths = np.array([len(o) for o in outputs], dtype=np.int64)
        stacked = np.zeros((len(outputs), lengths.max(), outputs[0].shape[1]), dtype=np.float32)
        for row, output in zip(stacked, outputs):
            row[: len(output)] = output
        np.save(args.out, stacked)
        np.save(args.out[: -len(".npy")] + ".lengths.npy" if args.out.endswith(".npy") else args.out + ".lengths.npy",
                lengths)
    print(f"wrote {args.out}: {len(outputs)} input(s), dim {outputs[0].shape[1]}")
    return 0


def entry() -> None:
    """The `d2v` console script and `python -m flows.cli`."""
    sys.exit(main(exit_after_eval=True))


if __name__ == "__main__":
    entry()
