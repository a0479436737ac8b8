"""`d2v eval report`: result files in, one Markdown page with tables and plots out, one section per task.

Rendering is a pure function of the results, so the page is testable without a disk or matplotlib;
loading, plotting and writing are the thin shell around it.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from pipelines.storage import Location, join, redact, write_atomic
from schemas.evaluation import EVAL_SCHEMA_VERSION, READABLE_VERSIONS, EvalResult

__all__ = ["group_by_section", "load_results", "plot_section", "render_markdown", "section_of", "write_report"]


@dataclass(frozen=True)
class Metric:
    """How a metric is shown: fractions become percentages (MCC, a correlation, is shown x100)."""

    title: str
    lower_is_better: bool = False
    scale: float = 100.0
    suffix: str = "%"

    def format(self, value: float | None) -> str:
        if value is None:
            return "–"
        if not math.isfinite(value):
            return str(value)
        return f"{value * self.scale:.2f}{self.suffix}" if self.scale != 1 else f"{value:.4g}"

    def better(self, a: float, b: float) -> bool:
        return a < b if self.lower_is_better else a > b


METRICS = {
    "wer": Metric("WER", lower_is_better=True),
    "cer": Metric("CER", lower_is_better=True),
    "top1": Metric("top-1"),
    "top5": Metric("top-5"),
    "accuracy": Metric("accuracy"),
    "f1": Metric("F1"),
    "mcc": Metric("MCC×100", suffix=""),
}
# The number a section is judged by: the paper's headline per task (GLUE's per task for text).
HEADLINE = {"speech-ctc": "wer", "image-probe": "top1", "image-finetune": "top1", "text-cls": "accuracy"}
GLUE_HEADLINE = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}


def metric(name: str) -> Metric:
    """Unknown metrics are shown as plain numbers, higher taken as better."""
    return METRICS.get(name, Metric(name, scale=1.0, suffix=""))


# ---------------------------------------------------------------- loading


def load_results(urls: Sequence[str]) -> list[EvalResult]:
    """Each URL's result, in order; a missing or invalid file is a ValueError naming it."""
    results = []
    for url in urls:
        shown = redact(url)
        fs, path = Location(url).filesystem()
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise ValueError(f"{shown}: no such result file") from None
        except IsADirectoryError:
            raise ValueError(f"{shown}: a folder, not a result file") from None
        try:
            result = EvalResult.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{shown}: not an evaluation result: "
                             f"{where + ': ' if where else ''}{first['msg']}") from None
        if result.version not in READABLE_VERSIONS:
            raise ValueError(f"{shown}: result version {result.version}, this d2v reads version {EVAL_SCHEMA_VERSION}")
        results.append(result)
    return results


# ---------------------------------------------------------------- grouping


def section_of(result: EvalResult) -> str:
    """Results that can share a table: the same task (and, for text, the same GLUE task)."""
    glue = result.hyperparameters.get("glue_task")
    return f"{result.task} ({glue})" if result.task == "text-cls" and glue else result.task


def group_by_section(results: Sequence[EvalResult]) -> dict[str, list[EvalResult]]:
    """Sections in order of first appearance, results in input order within each."""
    sections: dict[str, list[EvalResult]] = {}
    for result in results:
        sections.setdefault(section_of(result), []).append(result)
    return sections


def slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-") or "results"


def section_metrics(results: Sequence[EvalResult]) -> list[str]:
    """Known metrics in their usual order, then any others alphabetically."""
    present = {name for r in results for name in r.metrics}
    return [name for name in METRICS if name in present] + sorted(present - METRICS.keys())


def headline_of(results: Sequence[EvalResult]) -> str | None:
    names = section_metrics(results)
    if not names:
        return None
    first = results[0]
    preferred = HEADLINE.get(first.task)
    glue = str(first.hyperparameters.get("glue_task", "")).lower()
    if first.task == "text-cls" and glue in GLUE_HEADLINE:
        preferred = GLUE_HEADLINE[glue]
    return preferred if preferred in names else names[0]


def best_index(values: Sequence[float | None], how: Metric) -> int | None:
    """The first row holding the best finite value."""
    best = None
    for i, value in enumerate(values):
        if value is not None and math.isfinite(value) and (best is None or how.better(value, values[best])):
            best = i
    return best


def is_random(result: EvalResult) -> bool:
    return result.label == "random" or result.checkpoint.url == "random"


# ---------------------------------------------------------------- one line (pure)


def one_line(result: EvalResult) -> str:
    """The result as a terminal or log line: the metrics against the trivial baseline, the labels
    used and the cost; the whole result (loss curve included) goes to --out and the reports."""
    shown = ", ".join(f"{metric(n).title} {metric(n).format(v)}" for n, v in result.metrics.items()
                      if n in METRICS) or ", ".join(f"{n} {v:.4g}" for n, v in result.metrics.items())
    headline = headline_of([result])
    base = f" (trivial baseline {metric(headline).title} {metric(headline).format(result.baseline[headline])})" \
        if headline and headline in result.baseline else ""
    data = result.data
    labelled = data.labelled
    if labelled is None:
        labels = f"{data.train_samples:,} labelled samples of {data.train_split} (all)"
    else:
        extra = [f"{labelled.seconds / 60:.1f} min" if labelled.seconds is not None else None,
                 f"{labelled.speakers} speakers" if labelled.speakers is not None else None,
                 f"{labelled.classes} classes" if labelled.classes is not None else None]
        labels = (f"budget {labelled.budget}: {labelled.samples:,} labelled samples of {data.train_split}"
                  + "".join(f", {e}" for e in extra if e))
    return (f"{result.task} {result.label}: {shown}{base} on {data.eval_split} ({data.eval_samples:,} scored) | "
            f"{labels} | {result.steps:,} updates, seed {result.seed}, {_duration(result.elapsed_s)}")


# ---------------------------------------------------------------- Markdown (pure)


def render_markdown(results: Sequence[EvalResult], title: str, plots: dict[str, list[str]]) -> str:
    """The report page; `plots` maps a section (see `section_of`) to its image paths, relative to the page."""
    legend = ("Metrics are percentages of the evaluation split (MCC ×100). **Bold**: the best value in its column "
              "(lowest for error rates, highest otherwise). Baseline: the trivial predictor on the same data.")
    lines = [f"# {title}", "", legend, ""]
    for section, members in group_by_section(results).items():
        lines += _section(section, members, plots.get(section, []))
    return "\n".join(lines).rstrip() + "\n"


def _section(section: str, results: list[EvalResult], plots: list[str]) -> list[str]:
    names = section_metrics(results)
    headline = headline_of(results)
    header = ["label", "checkpoint", "model", "fine-tune steps", *(metric(n).title for n in names)]
    if headline:
        header.append(f"baseline {metric(headline).title}")
    header += ["data (train → eval samples)", "elapsed"]
    columns = {n: [r.metrics.get(n) for r in results] for n in names}
    bold = {n: _best_rows(values, metric(n)) for n, values in columns.items()}
    lines = [f"## {section}", "", _row(header), _row(["---"] * len(header))]
    for i, r in enumerate(results):
        cells = [r.label, _checkpoint(r), r.checkpoint.model, f"{r.steps:,}"]
        for n in names:
            text = metric(n).format(columns[n][i])
            cells.append(f"**{text}**" if i in bold[n] else text)
        if headline:
            cells.append(metric(headline).format(r.baseline.get(headline)))
        cells += [f"{r.data.train_split} ({r.data.train_samples:,}) → {r.data.eval_split} ({r.data.eval_samples:,})",
                  _duration(r.elapsed_s)]
        lines.append(_row(cells))
    lines.append("")
    comparisons = _comparisons(results, headline) if headline else []
    if comparisons:
        lines += [*(f"- {c}" for c in comparisons), ""]
    lines += [f"![{section}: {_plot_kind(path)}]({path})" for path in plots]
    if plots:
        lines.append("")
    lines += ["How these were made:", "", *(f"- {_provenance(r)}" for r in results), ""]
    return lines


def _plot_kind(path: str) -> str:
    """'speech-ctc-loss.png' -> 'loss': the image's alt text after its section."""
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0].rsplit("-", 1)[-1]


def _best_rows(values: list[float | None], how: Metric) -> set[int]:
    """Rows equal to the best value; none when fewer than two rows have a value to compare."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    best = best_index(values, how)
    if len(finite) < 2 or best is None:
        return set()
    return {i for i, v in enumerate(values) if v == values[best]}


def _comparisons(results: list[EvalResult], headline: str) -> list[str]:
    """The best result against every other one (random initialisations first), and against the baseline."""
    how = metric(headline)
    best = best_index([r.metrics.get(headline) for r in results], how)
    if best is None:
        return []
    winner = results[best]
    others = [r for i, r in enumerate(results) if i != best]
    others.sort(key=lambda r: not is_random(r))  # stable: input order otherwise
    score = winner.metrics[headline]
    lines = [_versus(winner.label, r.label, score, r.metrics.get(headline), how) for r in others]
    if headline in winner.baseline:
        lines.append(_versus(winner.label, "trivial baseline", score, winner.baseline[headline], how))
    return lines


def _versus(a_label: str, b_label: str, a: float, b: float | None, how: Metric) -> str:
    text = f"{a_label} vs {b_label}: {how.title} {how.format(a)} vs {how.format(b)}"
    if b is None or not (math.isfinite(a) and math.isfinite(b)):
        return text
    unit = "points" if how.scale == 100 else "difference"
    return f"{text} ({(a - b) * how.scale:+.2f} {unit})"


def _checkpoint(r: EvalResult) -> str:
    if r.checkpoint.url == "random":
        return "random init"
    url = f"`{redact(r.checkpoint.url)}`"
    return f"{url} @ step {r.checkpoint.step:,}" if r.checkpoint.step is not None else url


def _provenance(r: EvalResult) -> str:
    hyper = ", ".join(f"{k}={_compact(v)}" for k, v in sorted(r.hyperparameters.items())) or "none recorded"
    return (f"**{_escape(r.label)}**: {r.steps:,} steps on world size {r.world_size}, seed {r.seed}; "
            f"{r.checkpoint.parameters:,} encoder parameters; data `{redact(r.data.url)}`; "
            f"hyperparameters: `{hyper}`")


def _compact(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(_escape(c) for c in cells) + " |"


# ---------------------------------------------------------------- plots


def plot_section(section: str, results: Sequence[EvalResult]) -> dict[str, bytes]:
    """PNG files for one section: its metrics per result (baselines dashed) and, when any run
    recorded one, the fine-tuning loss curves."""
    name = slug(section)
    names = [n for n in section_metrics(results) if n in METRICS]
    plots = {}
    if names:
        plots[f"{name}-metrics.png"] = _metrics_chart(section, results, names)
    if any(r.curve for r in results):
        plots[f"{name}-loss.png"] = _loss_chart(section, results)
    return plots


def new_figure(width: float, height: float):
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _metrics_chart(section: str, results: Sequence[EvalResult], names: list[str]) -> bytes:
    figure = new_figure(max(5.0, 1.2 + 0.9 * len(results) * len(names)), 4.0)
    ax = figure.add_subplot()
    width = 0.8 / len(results)
    baseline_drawn = False
    for j, r in enumerate(results):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
        heights = [_plottable(r.metrics.get(n), metric(n)) for n in names]
        bars = ax.bar(xs, heights, width * 0.9, label=r.label)
        ax.bar_label(bars, fmt="%.1f", fontsize="small")
        for x, n in zip(xs, names):
            if n in r.baseline and math.isfinite(r.baseline[n]):
                ax.hlines(r.baseline[n] * metric(n).scale, x - width * 0.45, x + width * 0.45, colors="black",
                          linestyles="dashed", label=None if baseline_drawn else "trivial baseline")
                baseline_drawn = True
    ax.set_xticks(range(len(names)), [metric(n).title for n in names])
    lower = all(metric(n).lower_is_better for n in names)
    higher = not any(metric(n).lower_is_better for n in names)
    ax.set_title(f"{section}" + (" (lower is better)" if lower else " (higher is better)" if higher else ""))
    ax.set_ylabel("%")
    ax.legend(fontsize="small")
    return png_bytes(figure)


def _plottable(value: float | None, how: Metric) -> float:
    return value * how.scale if value is not None and math.isfinite(value) else 0.0


def _loss_chart(section: str, results: Sequence[EvalResult]) -> bytes:
    figure = new_figure(6.0, 4.0)
    ax = figure.add_subplot()
    for r in results:
        if r.curve:
            ax.plot([p.step for p in r.curve], [p.loss for p in r.curve], label=r.label)
    ax.set_title(f"{section}: fine-tuning loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    return png_bytes(figure)


# ---------------------------------------------------------------- the shell


def write_report(urls: Sequence[str], out: str, *, title: str) -> str:
    """Write report.md, its PNG plots and results.json (all results, for machines) into `out`
    (a folder or any fsspec URL); returns where report.md is."""
    results = load_results(urls)
    location = Location(out)
    fs, root = location.filesystem()
    plots: dict[str, list[str]] = {}
    for section, members in group_by_section(results).items():
        for name, png in plot_section(section, members).items():
            write_atomic(fs, join(root, name), png)
            plots.setdefault(section, []).append(name)
    everything = TypeAdapter(list[EvalResult]).dump_json(results, indent=2) + b"\n"
    write_atomic(fs, join(root, "results.json"), everything)
    write_atomic(fs, join(root, "report.md"), render_markdown(results, title, plots).encode())
    return location.child("report.md").public_url()
