"""`d2v eval curve TASK ...`: run TASK per checkpoint x budget x seed, keep every result, draw the curve.

Every run is a plain `d2v eval TASK` (its options passed through, plus the budget's own option
and the seed), so a point of the curve can be reproduced alone. Runs go one after another in
this process (also under torchrun, every rank in step), or side by side in `--jobs` worker
processes that split the CPU threads between them.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from pydantic import TypeAdapter

from d2v_train.eval import curve, labelled, report, runtime
from d2v_train.eval.report import one_line
from pipelines.storage import Location, join, write_atomic
from schemas.evaluation import EvalResult


@dataclass(frozen=True)
class Run:
    checkpoint: str
    number: int  # its place among the --checkpoint options
    budget: str
    seed: int
    argv: tuple[str, ...]  # the whole `d2v eval TASK` command line, --out included
    out: str


def budget_options(task: str, budget: str) -> list[str]:
    """The task's own option for one budget string of --budgets (validated here, before any run)."""
    text = budget.strip()
    if text.lower() == "all":
        return []
    if task == "speech-ctc":
        labelled.Budget.parse(text, option="--budgets")
        return ["--labelled", text]
    if task in ("image-probe", "image-finetune"):
        if text.endswith("%"):
            try:
                fraction = float(text[:-1]) / 100
            except ValueError:
                fraction = -1.0
            if not 0 < fraction <= 1:
                raise ValueError(f"--budgets {budget!r}: a percentage of each class must be in (0, 100]")
            return ["--label-fraction", f"{fraction:g}"]
        return ["--labels-per-class", str(labelled.Budget.parse(text, option="--budgets", durations=False).count)]
    return ["--train-limit", str(labelled.Budget.parse(text, option="--budgets", durations=False).count)]


def plan_runs(args, extra: list[str]) -> list[Run]:
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise ValueError("--budgets: give at least one budget")
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    forbidden = {"--checkpoint", "--seed", "--out", "--labelled", "--labels-per-class", "--label-fraction",
                 "--train-limit", "--json"} & {e.split("=", 1)[0] for e in extra}
    if forbidden:
        raise ValueError(f"{', '.join(sorted(forbidden))}: set by `d2v eval curve` itself (use --checkpoint, "
                         f"--budgets, --seeds, --out)")
    options = {b: budget_options(args.curve_task, b) for b in budgets}
    if any(c == "random" for c in args.checkpoints) and not args.model:
        raise ValueError("--checkpoint random needs --model (a preset such as speech_tiny)")
    trained = [c for c in args.checkpoints if c != "random"]
    runs = []
    for budget in budgets:
        for seed in range(args.seeds):
            for number, checkpoint in enumerate(args.checkpoints):
                name = "random" if checkpoint == "random" else "pretrained" if len(trained) == 1 \
                    else f"checkpoint{number}"
                out = join(args.results or join(args.out, "results"), f"{name}-{_slug(budget)}-seed{seed}.json")
                model = ["--model", args.model] if args.model and checkpoint == "random" else []
                argv = ("--checkpoint", checkpoint, *model, *extra, *options[budget], "--seed", str(seed),
                        "--out", out)
                runs.append(Run(checkpoint, number, budget, seed, argv, out))
    return runs


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9.]+", "_", text).strip("_") or "all"


def run_curve(args, extra: list[str]) -> str:
    """All runs, then the report; returns where report.md is."""
    runs = plan_runs(args, extra)
    from d2v_train.eval.tasks import parse_task

    for run in runs:  # every command line is checked before the first run
        parse_task(args.curve_task, list(run.argv))
    world = runtime.start()
    try:
        if args.jobs > 1 and world.size > 1:
            raise ValueError("--jobs: under torchrun the runs go one after another (leave --jobs out)")
        runtime.log(world, f"curve: {len(runs)} runs of {args.curve_task} "
                           f"({len(args.checkpoints)} checkpoints x {len(set(r.budget for r in runs))} budgets x "
                           f"{args.seeds} seeds)")
        results = _run_all(args.curve_task, runs, args.jobs, world)
        for run, result in distinct_labels(runs, results):
            if world.main:
                runtime.publish(result, run.out)  # the file says what the report says
        if not world.main:
            return ""
        return write_curve_report(results, args.out, metric_name=args.metric,
                                  title=args.title or f"Label efficiency: {args.curve_task}")
    finally:
        runtime.stop()


def distinct_labels(runs: list[Run], results: list[EvalResult]) -> list[tuple[Run, EvalResult]]:
    """Two checkpoints with the same default label (two runs' "step 1000") get their place on the
    command line added, so the curve keeps them apart; returns the (run, result) pairs relabelled."""
    labels: dict[str, set[str]] = {}
    for run, result in zip(runs, results):
        labels.setdefault(result.label, set()).add(run.checkpoint)
    changed = []
    for run, result in zip(runs, results):
        if len(labels[result.label]) > 1:
            changed.append((run, result))
    for run, result in changed:
        result.label = f"{result.label} #{run.number + 1}"
    return changed


def _run_all(task: str, runs: list[Run], jobs: int, world) -> list[EvalResult]:
    if jobs <= 1:
        from d2v_train.eval.tasks import evaluate_once, parse_task

        results = []
        for run in runs:
            result = evaluate_once(parse_task(task, list(run.argv)), world)
            if world.main:
                runtime.publish(result, run.out)
                runtime.log(world, one_line(result))
            results.append(result)
        return results
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_spawn(), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_worker_run, task, run.argv) for run in runs]
        results = []
        for run, future in zip(runs, futures):
            result = EvalResult.model_validate_json(future.result())
            runtime.publish(result, run.out)
            runtime.log(world, one_line(result))
            results.append(result)
        return results


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")  # no forked torch threads


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _worker_run(task: str, argv: tuple[str, ...]) -> str:
    """One run in a worker process; the result comes back as JSON (the parent publishes it)."""
    import torch

    from d2v_train.distributed import World
    from d2v_train.eval.tasks import evaluate_once, parse_task

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return evaluate_once(parse_task(task, list(argv)), World(0, 1, device)).model_dump_json()


def write_curve_report(results: list[EvalResult], out: str, *, metric_name: str | None, title: str) -> str:
    """report.md (the gain first, then the curve's table and figure, then every run's table as
    `d2v eval report` shows it), curve.png, the runs' plots, curve.json (the points and the gain
    sentences) and results.json (every result)."""
    if not results:
        raise ValueError("no results")
    name = metric_name or curve.CURVE_METRIC[results[0].task]
    if not any(name in r.metrics for r in results):
        raise ValueError(f"--metric {name!r}: the results have {', '.join(sorted(results[0].metrics))}")
    fs, root = Location(out).filesystem()
    fs.makedirs(root, exist_ok=True)
    write_atomic(fs, join(root, "curve.png"), curve.plot_curve(results, name))
    write_atomic(fs, join(root, "curve.json"), (json.dumps(curve.summary(results, name), indent=2) + "\n").encode())
    plots: dict[str, list[str]] = {}
    for section, members in report.group_by_section(results).items():
        for file, png in report.plot_section(section, members).items():
            write_atomic(fs, join(root, file), png)
            plots.setdefault(section, []).append(file)
    write_atomic(fs, join(root, "results.json"),
                 TypeAdapter(list[EvalResult]).dump_json(results, indent=2) + b"\n")
    page = curve.render_markdown(results, name, title, "curve.png") + "\n" + report.render_markdown(
        results, "Every run", plots).replace("# Every run", "## Every run", 1).replace("\n## ", "\n### ")
    write_atomic(fs, join(root, "report.md"), page.encode())
    return Location(out).child("report.md").public_url()
