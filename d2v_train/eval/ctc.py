"""The character vocabulary of CTC fine-tuning and greedy decoding, as pure functions.

Two vocabularies (DATA2VEC.md section 6): `letters`, fairseq's English one for LibriSpeech (blank,
the word boundary "|", A-Z and the apostrophe; other characters are dropped and counted, so a
corpus with digits or punctuation still trains and the result says how much was lost), and
`data`: blank, "|" and every character of the labelled transcripts, upper-cased as the letters
are, so that another language keeps its characters. With `data`, references keep every character
(one the model never saw in training counts as an error); with `letters` they are normalised to
the letters, as fairseq scores LibriSpeech.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

BLANK = 0
WORD_BOUNDARY = "|"
LETTERS = ("<blank>", WORD_BOUNDARY, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
SYMBOLS = LETTERS  # the default vocabulary


@dataclass(frozen=True)
class Vocabulary:
    symbols: tuple[str, ...] = LETTERS
    kind: str = "letters"  # "letters" or "data"

    @classmethod
    def from_transcripts(cls, texts: Iterable[str]) -> Vocabulary:
        """blank, "|" and the sorted characters of `texts` (upper-cased, spaces left out)."""
        found = sorted({c for text in texts for c in text.upper() if not c.isspace() and c != WORD_BOUNDARY})
        return cls(("<blank>", WORD_BOUNDARY, *found), "data")

    @classmethod
    def named(cls, kind: str, texts: Iterable[str]) -> Vocabulary:
        if kind == "letters":
            return cls()
        if kind == "data":
            return cls.from_transcripts(texts)
        raise ValueError(f"--vocab {kind!r}: expected letters or data")

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def ids(self) -> dict[str, int]:
        return {symbol: i for i, symbol in enumerate(self.symbols)}

    def encode(self, text: str) -> tuple[list[int], int]:
        """Label ids of `text` (words joined by the boundary, none at the ends), and how many
        characters fell outside the vocabulary."""
        known = self.ids
        ids: list[int] = []
        dropped = 0
        for word in text.upper().split():
            letters = [known[c] for c in word if c in known and c != WORD_BOUNDARY and known[c] != BLANK]
            dropped += len(word) - len(letters)
            if letters:
                if ids:
                    ids.append(known[WORD_BOUNDARY])
                ids.extend(letters)
        return ids, dropped

    def reference(self, text: str) -> str:
        """The reference as it is scored: upper case, single spaces; with the letters, only letters."""
        if self.kind == "data":
            return " ".join(text.upper().split())
        known = self.ids
        words = ("".join(c for c in word if c in known and c != WORD_BOUNDARY) for word in text.upper().split())
        return " ".join(w for w in words if w)

    def greedy_decode(self, best_T: np.ndarray) -> str:
        """Best path -> text: merge repeats, drop blanks, boundaries become single spaces."""
        best_T = np.asarray(best_T)
        if best_T.size == 0:
            return ""
        keep = np.ones(best_T.size, dtype=bool)
        keep[1:] = best_T[1:] != best_T[:-1]
        symbols = [self.symbols[i] for i in best_T[keep] if i != BLANK]
        return " ".join("".join(symbols).replace(WORD_BOUNDARY, " ").split())


_LETTERS = Vocabulary()


def encode_transcript(text: str) -> tuple[list[int], int]:
    """The letters vocabulary's `encode`."""
    return _LETTERS.encode(text)


def normalise_reference(text: str) -> str:
    """The letters vocabulary's `reference`."""
    return _LETTERS.reference(text)


def greedy_decode(best_T: np.ndarray) -> str:
    """The letters vocabulary's `greedy_decode`."""
    return _LETTERS.greedy_decode(best_T)
