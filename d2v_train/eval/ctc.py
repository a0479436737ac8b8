"""The letter vocabulary of CTC fine-tuning and greedy decoding, as pure functions.

Vocabulary (DATA2VEC.md section 6): blank, the word boundary "|", A-Z and the apostrophe.
LibriSpeech transcripts use exactly these; other characters are dropped and counted, so
a corpus with digits or punctuation still trains and the result says how much was lost.
"""
from __future__ import annotations

import numpy as np

BLANK = 0
WORD_BOUNDARY = "|"
SYMBOLS = ("<blank>", WORD_BOUNDARY, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
_ID = {symbol: i for i, symbol in enumerate(SYMBOLS)}


def encode_transcript(text: str) -> tuple[list[int], int]:
    """Label ids of `text` (words joined by the boundary, none at the ends), and how many
    characters fell outside the vocabulary."""
    ids: list[int] = []
    dropped = 0
    for word in text.upper().split():
        letters = [_ID[c] for c in word if c in _ID and c != WORD_BOUNDARY]
        dropped += len(word) - len(letters)
        if letters:
            if ids:
                ids.append(_ID[WORD_BOUNDARY])
            ids.extend(letters)
    return ids, dropped


def normalise_reference(text: str) -> str:
    """The reference as the model could write it: upper case, vocabulary characters, single spaces."""
    words = ("".join(c for c in word if c in _ID and c != WORD_BOUNDARY) for word in text.upper().split())
    return " ".join(w for w in words if w)


def greedy_decode(best_T: np.ndarray) -> str:
    """Best path -> text: merge repeats, drop blanks, boundaries become single spaces."""
    best_T = np.asarray(best_T)
    if best_T.size == 0:
        return ""
    keep = np.ones(best_T.size, dtype=bool)
    keep[1:] = best_T[1:] != best_T[:-1]
    symbols = [SYMBOLS[i] for i in best_T[keep] if i != BLANK]
    return " ".join("".join(symbols).replace(WORD_BOUNDARY, " ").split())
