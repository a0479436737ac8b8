"""GLUE-format TSV files as the benchmark ships them: which columns hold the text and the label per
task, the label order, and each task's scores.

A data folder (any fsspec URL) holds `{split}.tsv` (train.tsv, dev.tsv; MNLI: dev_matched.tsv,
dev_mismatched.tsv). The task comes from `--glue-task` or the folder's name (".../SST-2"); a folder
of another name is read as a generic headed TSV with `sentence` (or `sentence1` and `sentence2`)
and `label` columns. Rows are split on tabs with no quote handling (csv.QUOTE_NONE), as GLUE's own
loaders do: MNLI and QQP hold stray quote characters that a quoting reader would merge across rows.
"""
from __future__ import annotations

import csv
import posixpath
from dataclasses import dataclass

import numpy as np

from d2v_train.eval import metrics
from pipelines.storage import Location

__all__ = ["GlueTask", "Example", "GlueData", "TASKS", "task_for", "read_split", "label_order", "load_glue",
           "scores"]


@dataclass(frozen=True)
class GlueTask:
    """Where a task keeps its text and label: column names of a headed file, or indices of a
    headerless one (CoLA), and the label order when the benchmark fixes one."""

    name: str
    text_a: str | int
    label: str | int
    text_b: str | int | None = None
    columns: int | None = None  # headerless files: the column count every row must have
    labels: tuple[str, ...] | None = None  # canonical order (label index = position); None: sorted train labels
    headline: str = "accuracy"  # the metric GLUE reports for the task

    @property
    def headed(self) -> bool:
        return self.columns is None


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: str


@dataclass
class GlueData:
    task: GlueTask
    labels: tuple[str, ...]  # label index -> label text
    train: list[Example]
    eval: list[Example]
    train_y: np.ndarray  # label indices
    eval_y: np.ndarray

    @property
    def pairs(self) -> bool:
        return self.task.text_b is not None


_BINARY = ("0", "1")
_NLI = ("entailment", "not_entailment")
TASKS = {
    # CoLA train/dev: no header; source, label, the original annotation ("*" or empty), sentence
    "cola": GlueTask("CoLA", text_a=3, label=1, columns=4, labels=_BINARY, headline="mcc"),
    "sst2": GlueTask("SST-2", text_a="sentence", label="label", labels=_BINARY),
    "mrpc": GlueTask("MRPC", text_a="#1 String", text_b="#2 String", label="Quality", labels=_BINARY,
                     headline="f1"),
    "qqp": GlueTask("QQP", text_a="question1", text_b="question2", label="is_duplicate", labels=_BINARY,
                    headline="f1"),
    "mnli": GlueTask("MNLI", text_a="sentence1", text_b="sentence2", label="gold_label",
                     labels=("contradiction", "entailment", "neutral")),
    "qnli": GlueTask("QNLI", text_a="question", text_b="sentence", label="label", labels=_NLI),
    "rte": GlueTask("RTE", text_a="sentence1", text_b="sentence2", label="label", labels=_NLI),
    "wnli": GlueTask("WNLI", text_a="sentence1", text_b="sentence2", label="label", labels=_BINARY),
}
_REGRESSION = {"stsb": "STS-B"}
_SINGLE = GlueTask("TSV (sentence, label)", text_a="sentence", label="label")
_PAIR = GlueTask("TSV (sentence1, sentence2, label)", text_a="sentence1", text_b="sentence2", label="label")
GENERIC = "tsv"


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def task_for(data_url: str, glue_task: str | None = None) -> str:
    """The task key: `glue_task` if given (case-insensitive, "SST-2" = "sst2"), else the data
    folder's last path component when it names a GLUE task, else GENERIC (columns from the header)."""
    name = glue_task or data_url.rstrip("/").rsplit("/", 1)[-1]
    key = _key(name)
    if key in _REGRESSION:
        raise ValueError(f"{_REGRESSION[key]} is a regression task (a similarity score, not a class): "
                         "text-cls handles the classification tasks only")
    if key in TASKS:
        return key
    if glue_task is not None and key != GENERIC:
        known = ", ".join(t.name for t in TASKS.values())
        raise ValueError(f"--glue-task {glue_task}: unknown; expected one of {known} "
                         f"(or {GENERIC}: a headed TSV with sentence[1][, sentence2] and label columns)")
    return GENERIC


def read_split(data_url: str, split: str, key: str) -> tuple[GlueTask, list[Example]]:
    """The examples of `{data_url}/{split}.tsv`; for GENERIC, the task its header describes."""
    fs, root = Location(data_url).filesystem()
    path = posixpath.join(root, f"{split}.tsv")
    if not fs.exists(path):
        found = sorted(posixpath.basename(p)[:-4] for p in fs.ls(root, detail=False) if p.endswith(".tsv")) \
            if fs.isdir(root) else []
        raise ValueError(f"{data_url}: no {split}.tsv (splits there: {', '.join(found) or 'none'})")
    where = f"{data_url.rstrip('/')}/{split}.tsv"
    rows = _rows(fs.cat_file(path), where)
    task = TASKS.get(key)
    if task is None or task.headed:
        if not rows:
            raise ValueError(f"{where}: empty (expected a header line)")
        (_, header), rows = rows[0], rows[1:]
        task = task or _generic(header, where)
        indices = _columns(task, header, where)
        columns = len(header)
    else:
        indices, columns = (task.text_a, task.text_b, task.label), task.columns
    examples = []
    for line, fields in rows:
        if len(fields) != columns:
            raise ValueError(f"{where} line {line}: {len(fields)} tab-separated columns, expected {columns} "
                             f"({task.name} layout)")
        a, b, y = indices
        examples.append(Example(fields[a], None if b is None else fields[b], fields[y].strip()))
    if not examples:
        raise ValueError(f"{where}: no examples")
    return task, examples


def _rows(data: bytes, where: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty line; bytes that are not UTF-8 name their line."""
    if data.startswith(b"\xef\xbb\xbf"):  # MRPC's files begin with a byte-order mark
        data = data[3:]
    rows = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where} line {number}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            (fields,) = csv.reader([text], delimiter="\t", quoting=csv.QUOTE_NONE)
        except csv.Error as exc:
            raise ValueError(f"{where} line {number}: {exc}") from None
        rows.append((number, fields))
    return rows


def _generic(header: list[str], where: str) -> GlueTask:
    if "label" in header and "sentence1" in header and "sentence2" in header:
        return _PAIR
    if "label" in header and "sentence" in header:
        return _SINGLE
    raise ValueError(f"{where}: not a known GLUE task folder, and the header {header} lacks the generic "
                     "columns (sentence, label) or (sentence1, sentence2, label); name the task with --glue-task")


def _columns(task: GlueTask, header: list[str], where: str) -> tuple[int, int | None, int]:
    wanted = [task.text_a, task.text_b, task.label]
    missing = [c for c in wanted if c is not None and c not in header]
    if missing:
        raise ValueError(f"{where}: the {task.name} header lacks {missing} (found {header})")
    return header.index(task.text_a), None if task.text_b is None else header.index(task.text_b), \
        header.index(task.label)


def label_order(task: GlueTask, train: list[Example]) -> tuple[str, ...]:
    """The task's canonical order, else the sorted labels of the train split (numerically when all
    are integers, so "10" follows "9")."""
    if task.labels is not None:
        return task.labels
    seen = {e.label for e in train}
    if all(_is_int(y) for y in seen):
        return tuple(sorted(seen, key=int))
    return tuple(sorted(seen))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _indices(examples: list[Example], labels: tuple[str, ...], where: str) -> np.ndarray:
    index = {y: i for i, y in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are not among the task's labels {list(labels)} "
                         "(taken from the train split unless the task fixes them)")
    return np.array([index[e.label] for e in examples], dtype=np.int64)


def load_glue(data_url: str, train_split: str, eval_split: str, glue_task: str | None = None) -> GlueData:
    """Both splits, with labels as indices in `label_order`; both must have the same layout."""
    key = task_for(data_url, glue_task)
    task, train = read_split(data_url, train_split, key)
    eval_task, evaluation = read_split(data_url, eval_split, key)
    if eval_task != task:
        raise ValueError(f"{data_url}: {train_split}.tsv is {task.name} but {eval_split}.tsv is {eval_task.name}")
    labels = label_order(task, train)
    if len(labels) < 2:
        raise ValueError(f"{data_url}/{train_split}.tsv: one label only ({list(labels)}): nothing to classify")
    return GlueData(task, labels, train, evaluation, _indices(train, labels, f"{data_url}/{train_split}.tsv"),
                    _indices(evaluation, labels, f"{data_url}/{eval_split}.tsv"))


def scores(confusion_CC: np.ndarray) -> dict[str, float]:
    """accuracy, plus F1 (of class 1) and MCC for two classes, from a (true, predicted) count matrix:
    counts sum exactly across ranks, so every rank's share is scored once."""
    confusion_CC = np.asarray(confusion_CC, dtype=np.int64)
    true, predicted = np.nonzero(confusion_CC)
    counts = confusion_CC[true, predicted]
    labels, predictions = np.repeat(true, counts), np.repeat(predicted, counts)
    out = {"accuracy": metrics.accuracy(predictions, labels)}
    if confusion_CC.shape[0] == 2:
        out["f1"] = metrics.binary_f1(predictions, labels)
        out["mcc"] = metrics.matthews_corrcoef(predictions, labels)
    return out
