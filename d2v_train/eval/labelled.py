"""Labelled-data budgets: which training samples a fine-tune may use, drawn from metadata alone.

The draw is a pure function of (the split's metadata, the budget, the subset seed), so every
checkpoint compared at a budget is fine-tuned on the same samples, and every rank of a torchrun
job draws the same subset before the loader splits batches between ranks (any world size gives
the same subset). Speech subsets are balanced over speakers and filled up to a duration or an
utterance count, the way Libri-light's limited-supervision sets are drawn; image subsets are
balanced over classes (K per class, or a fraction of each class); text subsets over labels.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|sec|m|min|h)$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Budget:
    """An amount of labels as asked for: a duration (seconds), a sample count, or everything."""

    text: str
    seconds: float | None = None
    count: int | None = None

    @property
    def everything(self) -> bool:
        return self.seconds is None and self.count is None

    @classmethod
    def parse(cls, text: str, *, option: str = "--labelled", durations: bool = True) -> Budget:
        """`all`, a count (`48`), or with `durations` a duration (`90s`, `10m`, `1h`, `1.5h`)."""
        value = str(text).strip().lower()
        if value == "all":
            return cls("all")
        if value.isdigit() and int(value) > 0:
            return cls(value, count=int(value))
        match = _DURATION.match(value)
        if durations and match and float(match.group(1)) > 0:
            return cls(value, seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        shapes = "'all', a count such as 48, or a duration such as 90s, 10m, 1h" if durations \
            else "'all' or a count such as 48"
        raise ValueError(f"{option} {text!r}: expected {shapes}")


def round_robin(groups: np.ndarray, seed: int) -> np.ndarray:
    """Row positions interleaved over groups: the groups in a seeded order, each group's rows in a
    seeded order, then one row of each group in turn (a prefix of any length is balanced)."""
    groups = np.asarray(groups, dtype=object)
    if groups.size == 0:
        return np.zeros(0, dtype=np.int64)
    names = sorted(set(groups.tolist()), key=str)
    rng = np.random.default_rng([seed, 23])
    names = [names[i] for i in rng.permutation(len(names))]
    members = [rng.permutation(np.flatnonzero(groups == name)) for name in names]
    # (turn within the group, group position): sorting by it interleaves the groups
    turn = np.concatenate([np.arange(len(m)) for m in members])
    where = np.concatenate([np.full(len(m), g) for g, m in enumerate(members)])
    rows = np.concatenate(members)
    return rows[np.lexsort((where, turn))].astype(np.int64)


@dataclass(frozen=True)
class Subset:
    """The rows drawn (positions in the split, ascending) and what they amount to."""

    rows: np.ndarray
    budget: str
    seconds: float | None = None  # speech: labelled audio
    groups: int = 0  # speakers (speech), classes (images) or labels (text) present

    @property
    def samples(self) -> int:
        return int(len(self.rows))


def speaker_balanced(speakers: np.ndarray, seconds: np.ndarray, eligible: np.ndarray, budget: Budget,
                     seed: int) -> Subset:
    """Speech: eligible (transcribed) utterances, speakers in turn, up to the budget. A duration is
    filled as closely as the utterances allow without going over (one that does not fit is passed
    over for later, shorter ones); a budget beyond the split takes all of it."""
    candidates = np.flatnonzero(eligible)
    if candidates.size == 0:
        raise ValueError("no transcribed utterances to draw a labelled subset from")
    order = candidates[round_robin(np.asarray(speakers, dtype=object)[candidates], seed)]
    if budget.everything:
        chosen = order
    elif budget.count is not None:
        chosen = order[: budget.count]
    else:
        durations = np.asarray(seconds, dtype=np.float64)[order]
        if durations.min() > budget.seconds:
            raise ValueError(f"--labelled {budget.text}: shorter than the shortest transcribed utterance "
                             f"({durations.min():.1f} s)")
        keep, total = np.zeros(len(order), dtype=bool), 0.0
        for i, d in enumerate(durations):
            if total + d <= budget.seconds + 1e-9:
                keep[i], total = True, total + d
        chosen = order[keep]
    rows = np.sort(chosen)
    return Subset(rows, budget.text, seconds=float(np.asarray(seconds, dtype=np.float64)[rows].sum()),
                  groups=len(set(np.asarray(speakers, dtype=object)[rows].tolist())))


def class_balanced(labels: np.ndarray, seed: int, *, per_class: int | None = None,
                   fraction: float | None = None) -> Subset:
    """Images: K of every class, or the fraction F of every class (at least one each), seeded."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give one of --labels-per-class and --label-fraction")
    if per_class is not None and per_class < 1:
        raise ValueError(f"--labels-per-class {per_class}: expected at least 1")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"--label-fraction {fraction}: expected a value in (0, 1]")
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 29])
    chosen = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        take = per_class if per_class is not None else max(1, round(fraction * len(members)))
        chosen.append(members[:take])
    rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    budget = f"{per_class}/class" if per_class is not None else "all" if fraction == 1 else f"{fraction:g}"
    return Subset(rows.astype(np.int64), budget, groups=len(np.unique(labels[rows])))


def label_balanced(labels: np.ndarray, limit: int | None, seed: int) -> Subset:
    """Text: at most `limit` examples (None: all), labels in turn (balanced while every label has
    examples left)."""
    labels = np.asarray(labels)
    if limit is None:
        return Subset(np.arange(len(labels), dtype=np.int64), "all", groups=len(np.unique(labels)))
    if limit < 1:
        raise ValueError(f"--train-limit {limit}: expected at least 1")
    rows = np.sort(round_robin(labels.astype(object), seed)[:limit])
    return Subset(rows, str(limit), groups=len(np.unique(labels[rows])))


def fingerprint(keys) -> str:
    """sha256 of the sorted keys, one per line: two results drew the same subset iff these match."""
    return hashlib.sha256("\n".join(sorted(str(k) for k in keys)).encode()).hexdigest()
