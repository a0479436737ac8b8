"""`d2v eval TASK ...` (and `torchrun d2v_train/eval/main.py TASK ...`): fine-tune or probe an
encoder on a downstream task and print one JSON result; `d2v eval report` compares results."""
from __future__ import annotations

import argparse

from d2v_train.eval.config import add_options, from_namespace
from d2v_train.eval.tasks import HELP, TASKS, evaluate_once


def add_parser(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="downstream evaluation of a checkpoint (or a random baseline)")
    tasks = evaluate.add_subparsers(dest="eval_task", required=True)
    for task in TASKS:
        parser = tasks.add_parser(task, help=HELP[task], description=HELP[task])
        add_options(parser, task)
    curve = tasks.add_parser(
        "curve", allow_abbrev=False, help="label-efficiency curve: a task at several labelled-data budgets per checkpoint",
        description="Runs TASK for every checkpoint at every budget (and fine-tuning seed), keeps every result under "
                    "--out/results/, and writes --out/report.md with the curve (metric against labelled amount). "
                    "Options not listed here go to `d2v eval TASK` unchanged (--data, --train-split, --steps, ...).")
    curve.add_argument("curve_task", metavar="TASK", choices=list(TASKS), help=f"the task: {', '.join(TASKS)}")
    curve.add_argument("--checkpoint", action="append", required=True, dest="checkpoints",
                       help="a checkpoint (as for d2v eval TASK), or 'random' (needs --model); give several")
    curve.add_argument("--model", default=None, help="the preset of --checkpoint random")
    curve.add_argument("--budgets", default="all",
                       help="comma-separated labelled-data budgets: speech durations or utterance counts (5m,20m,all); "
                            "images K per class (1,4,all) or fractions with %% (1%%,10%%); text example counts (64,all)")
    curve.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per point (0..N-1): mean and spread")
    curve.add_argument("--jobs", type=int, default=1,
                       help="runs side by side in worker processes (threads split between them); one process only")
    curve.add_argument("--metric", default=None, help="the metric the curve follows (default: the task's: cer, top1, accuracy)")
    curve.add_argument("--out", required=True, help="folder/URL for report.md, curve.png, curve.json and results.json")
    curve.add_argument("--results", default=None, help="folder/URL for every run's result JSON (default: OUT/results)")
    curve.add_argument("--title", default=None, help="the report's heading")
    report = tasks.add_parser("report", help="a Markdown report with plots comparing result files")
    report.add_argument("results", nargs="+", help="JSON files written by `d2v eval ... --out`")
    report.add_argument("--out", required=True, help="folder for report.md and its PNG plots")
    report.add_argument("--title", default="d2v evaluation report", help="the report's heading")


def main(argv: list[str], *, exit_after_eval: bool = False) -> int:
    """`d2v eval ARGV...` on its own (d2v_train/eval/main.py under torchrun): the same parser,
    the same one-line errors and exit codes as the `d2v` command."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="d2v")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(["eval", *argv])
    if extra and args.eval_task != "curve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")  # only the curve passes options on
    from pipelines.cli_errors import exit_code

    return exit_code(lambda: run_and_exit(args, extra, exit_after_eval=exit_after_eval))


def run_and_exit(args, extra: list[str], *, exit_after_eval: bool) -> int:
    """`run`; with `exit_after_eval` the process then ends without interpreter teardown (a
    finished rank could otherwise abort in it and fail the torchrun job)."""
    code = run(args, extra)
    if exit_after_eval and args.eval_task != "report":
        from d2v_train.teardown import exit_without_teardown

        exit_without_teardown(code)
    return code


def run(args, extra: list[str] | None = None) -> int:
    """`extra`: the options `d2v eval curve` passes on to its task (unknown ones are an error elsewhere)."""
    if args.eval_task == "report":
        from d2v_train.eval.report import write_report

        path = write_report(args.results, args.out, title=args.title)
        print(f"wrote {path}")
        return 0
    if args.eval_task == "curve":
        from d2v_train.eval.curve_run import run_curve

        print(f"wrote {run_curve(args, extra or [])}")
        return 0
    from d2v_train.eval import runtime

    cfg = from_namespace(args.eval_task, args)  # a value that cannot work fails here, naming its option
    if args.out:
        from pipelines.storage import check_output

        check_output(args.out, "--out")
    world = runtime.start()
    try:
        runtime.emit(evaluate_once(cfg, world), args.out, world, as_json=args.json)
    finally:
        runtime.stop()
    return 0


