"""Label-efficiency curves: a task's metric against the amount of labelled data, one line per checkpoint.

Summaries, the headline sentence and the Markdown page are pure functions of the results (each
run's result keeps its budget in `data.labelled`); plotting and writing are the thin shell. A
budget's spread over fine-tuning seeds is their standard deviation (ddof 1); a gain is stated as
significant only when it exceeds both encoders' spreads added together.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from d2v_train.eval.report import is_random, metric, new_figure, png_bytes, redact
from schemas.evaluation import EvalResult

# The metric a curve follows when none is asked for. Speech: CER, since greedy WER without a
# language model sits near 100% at small budgets for every encoder (the paper's low-resource WERs
# are LM-decoded), so it cannot separate them; the table still shows WER.
CURVE_METRIC = {"speech-ctc": "cer", "image-probe": "top1", "image-finetune": "top1", "text-cls": "accuracy"}


@dataclass(frozen=True)
class Point:
    """One checkpoint at one budget: the metric over its fine-tuning seeds."""

    label: str
    budget: str
    amount: float  # labelled amount on the x axis: minutes of audio, or labelled samples
    values: tuple[float, ...]
    random: bool

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def amount_of(result: EvalResult) -> tuple[float, str]:
    """(x value, its unit): minutes of labelled audio for speech, labelled samples otherwise."""
    labelled = result.data.labelled
    if result.task == "speech-ctc":
        seconds = labelled.seconds if labelled and labelled.seconds is not None else None
        if seconds is None:  # the whole split: its length is not in the result, count utterances instead
            return float(result.data.train_samples), "labelled utterances"
        return seconds / 60.0, "minutes of labelled audio"
    return float(labelled.samples if labelled else result.data.train_samples), "labelled samples"


def budget_of(result: EvalResult) -> str:
    return result.data.labelled.budget if result.data.labelled else "all"


def points(results: Sequence[EvalResult], name: str) -> list[Point]:
    """Results grouped by (label, budget), in order of first appearance."""
    groups: dict[tuple[str, str], list[EvalResult]] = {}
    for r in results:
        groups.setdefault((r.label, budget_of(r)), []).append(r)
    out = []
    for (label, budget), members in groups.items():
        values = tuple(float(r.metrics[name]) for r in members if name in r.metrics)
        if values:
            out.append(Point(label, budget, amount_of(members[0])[0], values, is_random(members[0])))
    return out


def budgets_in_order(pts: Sequence[Point]) -> list[str]:
    """Budgets by their labelled amount (the random encoder's, else any checkpoint's)."""
    amounts: dict[str, float] = {}
    for p in sorted(pts, key=lambda p: not p.random):
        amounts.setdefault(p.budget, p.amount)
    return sorted(amounts, key=lambda b: amounts[b])


def gain_sentences(pts: Sequence[Point], name: str, eval_split: str, unit: str = "minutes") -> list[str]:
    """Per budget and pre-trained checkpoint: what pre-training did to the metric against random init
    (`unit`: the x axis's, from `amount_of`)."""
    how = metric(name)
    by_budget = {b: [p for p in pts if p.budget == b] for b in budgets_in_order(pts)}
    lines = []
    for budget, members in by_budget.items():
        randoms = [p for p in members if p.random]
        if not randoms:
            continue
        base = randoms[0]
        for p in members:
            if p.random:
                continue
            seeds = f"{len(p.values)} seeds" if len(p.values) > 1 else "1 seed"
            labels = _budget_words(budget, p.amount, unit)
            if how.format(p.mean) == how.format(base.mean):
                lines.append(f"pre-training ({p.label}) leaves {eval_split} {how.title} at {how.format(p.mean)} with "
                             f"{labels} of labels, as random init does; mean of {seeds}")
                continue
            better = how.better(p.mean, base.mean)
            verb = ("cuts" if better else "raises") if how.lower_is_better else ("raises" if better else "lowers")
            significant = abs(p.mean - base.mean) > p.spread + base.spread
            ratio = f", {p.mean / base.mean:.2f}x" if base.mean and how.lower_is_better else ""
            lines.append(f"pre-training ({p.label}) {verb} {eval_split} {how.title} from {how.format(base.mean)} to "
                         f"{how.format(p.mean)} with {labels} of labels{ratio}; mean of {seeds}"
                         f"{'' if significant else ' (inside the seeds spread: not a clear difference)'}")
    return lines


def _budget_words(budget: str, amount: float, unit: str) -> str:
    """'1.0 min', 'all 3.2 min', '1/class (6 samples)', '64 samples', 'all 600 samples'."""
    prefix = "all " if budget == "all" else ""
    if unit.startswith("minutes"):
        return prefix + (f"{amount:.1f} min" if amount < 120 else f"{amount / 60:.1f} h")
    count = f"{amount:,.0f} {unit.split()[-1]}"
    return f"{budget} ({count})" if budget != "all" and not budget.isdigit() else prefix + count


def render_markdown(results: Sequence[EvalResult], name: str, title: str, plot: str | None) -> str:
    """The curve's page: the gain first, then the table (mean ± spread per budget), the figure, the runs."""
    if not results:
        raise ValueError("no results to draw a curve from")
    pts = points(results, name)
    how = metric(name)
    first = results[0]
    unit = amount_of(first)[1]
    budgets = budgets_in_order(pts)
    labels = list(dict.fromkeys(p.label for p in pts))
    sentences = gain_sentences(pts, name, first.data.eval_split, unit)
    lines = [f"# {title}", ""]
    lines += [f"**{s[0].upper() + s[1:]}.**" for s in sentences] or ["(no random-init results to compare with)"]
    lines += ["", f"{first.task}: {how.title} on `{first.data.eval_split}` "
                  f"({'lower' if how.lower_is_better else 'higher'} is better) against the labelled amount drawn "
                  f"from `{first.data.train_split}`; mean ± standard deviation over fine-tuning seeds.", ""]
    header = ["checkpoint", *(f"{b} ({_amount(pts, b)} {unit.split(' of ')[0]})" for b in budgets)]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label in labels:
        cells = [label]
        for b in budgets:
            p = next((p for p in pts if p.label == label and p.budget == b), None)
            cells.append("–" if p is None else f"{how.format(p.mean)} ± {how.format(p.spread)} (n={len(p.values)})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if plot:
        lines += [f"![{how.title} against labelled data]({plot})", ""]
    lines += ["Runs:", ""]
    for r in results:
        ckpt = "random init" if r.checkpoint.url == "random" else f"`{redact(r.checkpoint.url)}`"
        lines.append(f"- {r.label} ({ckpt}), budget {budget_of(r)}, seed {r.seed}: {how.title} "
                     f"{how.format(r.metrics.get(name))}, {r.data.train_samples:,} labelled samples, "
                     f"{r.steps:,} updates, {r.elapsed_s:.0f} s")
    return "\n".join(lines).rstrip() + "\n"


def _amount(pts: Sequence[Point], budget: str) -> str:
    amount = next(p.amount for p in pts if p.budget == budget)
    return f"{amount:.1f}" if amount != int(amount) else f"{int(amount)}"


def plot_curve(results: Sequence[EvalResult], name: str) -> bytes:
    """Metric against labelled amount on a log axis, one line per checkpoint, the seeds' spread shaded."""
    how = metric(name)
    pts = points(results, name)
    figure = new_figure(6.0, 4.0)
    ax = figure.add_subplot()
    for label in dict.fromkeys(p.label for p in pts):
        mine = sorted((p for p in pts if p.label == label), key=lambda p: p.amount)
        xs = [p.amount for p in mine]
        ys = [p.mean * how.scale for p in mine]
        spread = [p.spread * how.scale for p in mine]
        style = "--" if mine[0].random else "-"
        ax.plot(xs, ys, style, marker="o", label=label)
        ax.fill_between(xs, [y - s for y, s in zip(ys, spread)], [y + s for y, s in zip(ys, spread)], alpha=0.2)
    if pts and min(p.amount for p in pts) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(amount_of(results[0])[1])
    ax.set_ylabel(f"{how.title}{' (%)' if how.scale == 100 else ''}")
    ax.set_title(f"{results[0].task}: {how.title} against labelled data "
                 f"({'lower' if how.lower_is_better else 'higher'} is better)")
    ax.legend(fontsize="small")
    return png_bytes(figure)


def summary(results: Sequence[EvalResult], name: str) -> dict:
    """Machine-readable curve: per checkpoint and budget, the labelled amount, mean, spread and values."""
    return {"metric": name, "points": [
        {"label": p.label, "budget": p.budget, "amount": p.amount, "mean": p.mean, "spread": p.spread,
         "values": list(p.values), "random": p.random} for p in points(results, name)],
        "gains": gain_sentences(points(results, name), name, results[0].data.eval_split,
                                amount_of(results[0])[1]) if results else []}


