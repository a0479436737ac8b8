"""Scores of the data2vec paper's downstream tasks, as pure functions on plain Python/numpy values.

Error rates are kept as (edits, reference length) sums, so ranks and batches add up exactly and
the rate is taken once at the end (a mean of per-utterance rates would weight short ones more).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["edit_distance", "ErrorCounts", "error_counts", "topk_correct", "binary_f1", "matthews_corrcoef",
           "accuracy"]


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1) between sequences."""
    if len(reference) < len(hypothesis):
        reference, hypothesis = hypothesis, reference
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, start=1):
        current = [i]
        for j, hyp_item in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)))
        previous = current
    return previous[-1]


class ErrorCounts:
    """Word and character edits and reference lengths, summed over utterances."""

    def __init__(self, word_edits: int = 0, words: int = 0, char_edits: int = 0, chars: int = 0):
        self.word_edits, self.words, self.char_edits, self.chars = word_edits, words, char_edits, chars

    def add(self, other: ErrorCounts) -> None:
        self.word_edits += other.word_edits
        self.words += other.words
        self.char_edits += other.char_edits
        self.chars += other.chars

    def as_list(self) -> list[int]:
        return [self.word_edits, self.words, self.char_edits, self.chars]

    @property
    def wer(self) -> float:
        return _rate(self.word_edits, self.words)

    @property
    def cer(self) -> float:
        return _rate(self.char_edits, self.chars)


def _rate(edits: int, length: int) -> float:
    """Edits per reference unit; an empty reference scores 0 if nothing was hypothesised, else inf
    (every hypothesised unit is an insertion against nothing)."""
    if length == 0:
        return 0.0 if edits == 0 else math.inf
    return edits / length


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """WER counts words split on whitespace; CER counts characters of the text with single spaces
    (the word boundary is a character, as in wav2letter/fairseq's letter error rate)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    counts = ErrorCounts()
    for ref, hyp in zip(references, hypotheses):
        ref_words, hyp_words = ref.split(), hyp.split()
        ref_chars, hyp_chars = " ".join(ref_words), " ".join(hyp_words)
        counts.add(ErrorCounts(edit_distance(ref_words, hyp_words), len(ref_words),
                               edit_distance(ref_chars, hyp_chars), len(ref_chars)))
    return counts


def topk_correct(logits_NC: np.ndarray, labels_N: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest scores, per k (k capped at the classes)."""
    logits_NC, labels_N = np.asarray(logits_NC), np.asarray(labels_N)
    order_NC = np.argsort(-logits_NC, axis=1, kind="stable")
    hits = {}
    for k in ks:
        top_NK = order_NC[:, : min(k, logits_NC.shape[1])]
        hits[k] = int((top_NK == labels_N[:, None]).any(axis=1).sum())
    return hits


def accuracy(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if labels.size else 0.0


def _confusion(predictions, labels, positive: int = 1) -> tuple[int, int, int, int]:
    p, y = np.asarray(predictions) == positive, np.asarray(labels) == positive
    return int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()), int((~p & ~y).sum())


def binary_f1(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC and QQP); 0 when there are no true positives."""
    tp, fp, fn, _ = _confusion(predictions, labels, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(predictions, labels, positive: int = 1) -> float:
    """Matthews correlation (GLUE's CoLA); 0 when a margin is empty (sklearn's convention)."""
    tp, fp, fn, tn = _confusion(predictions, labels, positive)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0
