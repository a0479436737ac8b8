"""Word n-gram language models for CTC decoding: estimated from text into an ARPA file (`d2v lm
build`), and used in a CTC prefix beam search with shallow fusion of a KenLM model (ARPA or KenLM
binary). pyctcdecode, the usual decoder, pins numpy < 2, which the rest of d2v (pyarrow) cannot
use; the search is written here over KenLM's scoring, a pure function with unit tests.

The estimate is interpolated absolute discounting (Ney's discount n1 / (n1 + 2 n2) per order),
written as an ARPA backoff model: a seen n-gram stores its interpolated probability, a history
its weight for the lower order, so a reader's backoff gives exactly the interpolated model. Text
is upper-cased like the CTC vocabularies, one sentence per line, `<s>`/`</s>` around each.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
DEFAULT_ORDER = 4


def _discount(counts: Counter) -> float:
    """Ney's estimate n1 / (n1 + 2 n2) from the count-of-counts, within (0, 1)."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    if n1 == 0 or n1 + 2 * n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)


def estimate_arpa(sentences: Iterable[str], order: int = DEFAULT_ORDER) -> str:
    """The ARPA text of an interpolated absolute-discounting model of `sentences`."""
    if order < 1:
        raise ValueError(f"--order {order}: at least 1")
    grams: list[Counter] = [Counter() for _ in range(order + 1)]  # grams[n]: n-gram -> count
    for line in sentences:
        words = line.upper().split()
        if not words:
            continue
        tokens = [BOS, *words, EOS]
        for i in range(1, len(tokens)):  # each predicted token (never <s>) with its histories
            for n in range(1, min(order, i + 1) + 1):
                grams[n][tuple(tokens[i - n + 1: i + 1])] += 1
    if not grams[1]:
        raise ValueError("the text holds no words")
    probs: list[dict] = [{} for _ in range(order + 1)]
    backoffs: list[dict] = [{} for _ in range(order + 1)]
    # unigrams: discounted counts, the mass taken spread evenly over the vocabulary and <unk>
    total, d1 = sum(grams[1].values()), _discount(grams[1])
    uniform = d1 * len(grams[1]) / total / (len(grams[1]) + 1)
    for (word,), count in grams[1].items():
        probs[1][(word,)] = (count - d1) / total + uniform
    probs[1][(UNK,)] = uniform
    for n in range(2, order + 1):
        d = _discount(grams[n])
        history_total: dict[tuple, int] = defaultdict(int)
        history_types: dict[tuple, int] = defaultdict(int)
        for gram, count in grams[n].items():
            history_total[gram[:-1]] += count
            history_types[gram[:-1]] += 1
        for history in history_total:
            backoffs[n - 1][history] = d * history_types[history] / history_total[history]
        for gram, count in grams[n].items():
            history = gram[:-1]
            lower = _probability(probs, backoffs, gram[1:])
            probs[n][gram] = (count - d) / history_total[history] + backoffs[n - 1][history] * lower
    probs[1][(BOS,)] = None  # never predicted; a history only
    return _arpa_text(probs, backoffs, order)


def _probability(probs: list[dict], backoffs: list[dict], gram: tuple) -> float:
    """P(gram[-1] | gram[:-1]) by backoff through the orders estimated so far."""
    if len(gram) == 1:
        return probs[1].get(gram) or probs[1][(UNK,)]
    if gram in probs[len(gram)]:
        return probs[len(gram)][gram]
    return backoffs[len(gram) - 1].get(gram[:-1], 1.0) * _probability(probs, backoffs, gram[1:])


def _arpa_text(probs: list[dict], backoffs: list[dict], order: int) -> str:
    lines = ["", "\\data\\"] + [f"ngram {n}={len(probs[n])}" for n in range(1, order + 1)] + [""]
    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")
        for gram in sorted(probs[n]):
            p = probs[n][gram]
            logp = -99.0 if p is None else math.log10(p)
            entry = f"{logp:.6f}\t{' '.join(gram)}"
            if n < order and gram in backoffs[n]:
                entry += f"\t{math.log10(backoffs[n][gram]):.6f}"
            lines.append(entry)
        lines.append("")
    lines.append("\\end\\")
    return "\n".join(lines) + "\n"


def build_lm(text_url: str, out_url: str, order: int = DEFAULT_ORDER) -> dict[str, int]:
    """`d2v lm build`: an ARPA file at `out_url` from the lines of `text_url`; n-grams per order."""
    from pipelines.storage import Location

    fs, path = Location(text_url).filesystem()
    text = fs.cat_file(path).decode("utf-8")
    arpa = estimate_arpa(text.splitlines(), order)
    out_fs, out_path = Location(out_url).filesystem()
    out_fs.pipe_file(out_path, arpa.encode("utf-8"))
    return {line.split("=")[0].split()[1]: int(line.split("=")[1]) for line in arpa.splitlines()
            if line.startswith("ngram ")}


def check_lm(lm_url: str) -> None:
    """Before any fine-tuning: KenLM is installed and the LM file exists."""
    from pipelines.storage import Location

    try:
        import kenlm  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--lm needs the kenlm module (pip install 'd2v[lm]'; it builds from source): {exc}") from None
    fs, path = Location(lm_url).filesystem()
    if not fs.exists(path):
        raise ValueError(f"--lm {lm_url}: no such file")


class KenLMScorer:
    """Word scores (log10) from a KenLM model, state by state."""

    def __init__(self, path: str) -> None:
        import kenlm

        self._kenlm = kenlm
        self.model = kenlm.Model(path)

    def start(self):
        state = self._kenlm.State()
        self.model.BeginSentenceWrite(state)
        return state

    def word(self, state, word: str):
        """(log10 P(word | state), the state after it)."""
        out = self._kenlm.State()
        return self.model.BaseScore(state, word, out), out

    def end(self, state) -> float:
        return self.model.BaseScore(state, EOS, self._kenlm.State())


_LN10 = math.log(10.0)
_NONE = -math.inf


def _logadd(*values: float) -> float:
    top = max(values)
    if top == _NONE:
        return _NONE
    return top + math.log(sum(math.exp(v - top) for v in values))


def prefix_beam_search(log_probs_TV, symbols: tuple[str, ...], scorer=None, *, lm_weight: float = 0.5,
                       word_score: float = 1.0, beam: int = 50, token_prune: float = 10.0, max_tokens: int = 8) -> str:
    """CTC prefix beam search with shallow fusion of a word LM: a prefix's score is its CTC log
    probability (paths ending in blank or not, summed) + lm_weight x ln P_LM(its completed words)
    + word_score x their number; a word is scored when the boundary "|" closes it, the last one and
    </s> at the end. Symbol 0 is the blank; per frame only tokens within `token_prune` (natural log)
    of the best, at most `max_tokens`, are tried. Without a scorer: the CTC-only beam search."""
    import numpy as np

    boundary = symbols.index("|")
    log_probs_TV = np.asarray(log_probs_TV, dtype=np.float64)
    # prefix (symbol ids, no blanks) -> [log P(paths ending in blank), log P(paths ending in a symbol)]
    beams: dict[tuple, list[float]] = {(): [0.0, _NONE]}
    # prefix -> (LM part of its score, LM state after its last closed word, where its open word starts)
    lm: dict[tuple, tuple[float, object, int]] = {(): (0.0, scorer.start() if scorer else None, 0)}

    def lm_entry(prefix: tuple) -> tuple[float, object, int]:
        if prefix not in lm:  # its parent was a beam: cached
            score, state, start = lm_entry(prefix[:-1])
            if prefix[-1] == boundary:  # a word closes
                if scorer is not None:
                    log10p, state = scorer.word(state, "".join(symbols[i] for i in prefix[start:-1]))
                    score += lm_weight * log10p * _LN10
                score, start = score + word_score, len(prefix)
            lm[prefix] = (score, state, start)
        return lm[prefix]

    for frame in log_probs_TV:
        best = frame.max()
        candidates = [int(c) for c in np.argsort(-frame)[:max_tokens] if frame[c] >= best - token_prune]
        following: dict[tuple, list[float]] = {}
        for prefix, (p_blank, p_symbol) in beams.items():
            total = _logadd(p_blank, p_symbol)
            last = prefix[-1] if prefix else None
            for c in candidates:
                p = float(frame[c])
                if c == 0:
                    _add(following, prefix, 0, total + p)
                elif c == boundary and (last is None or last == boundary):
                    _add(following, prefix, 0 if last is None else 1, total + p)  # no empty words
                elif c == last:
                    _add(following, prefix + (c,), 1, p_blank + p)  # a repeat needs a blank between
                    _add(following, prefix, 1, p_symbol + p)  # else it merges
                else:
                    _add(following, prefix + (c,), 1, total + p)
        ranked = sorted(following.items(), key=lambda item: -(_logadd(*item[1]) + lm_entry(item[0])[0]))
        beams = dict(ranked[:beam])

    def final(prefix: tuple) -> float:
        score, state, start = lm_entry(prefix)
        if start < len(prefix):  # the last word is still open: it closes here
            if scorer is not None:
                log10p, state = scorer.word(state, "".join(symbols[i] for i in prefix[start:]))
                score += lm_weight * log10p * _LN10
            score += word_score
        if scorer is not None:
            score += lm_weight * scorer.end(state) * _LN10
        return _logadd(*beams[prefix]) + score

    best_prefix = max(beams, key=final)
    return " ".join("".join(symbols[i] for i in best_prefix).replace("|", " ").split())


def _add(beams: dict[tuple, list[float]], prefix: tuple, which: int, value: float) -> None:
    entry = beams.setdefault(prefix, [_NONE, _NONE])
    entry[which] = _logadd(entry[which], value)


class BeamDecoder:
    """The beam search with a KenLM model (ARPA or binary, any URL, read into a local file)."""

    def __init__(self, symbols: tuple[str, ...], lm_url: str, *, lm_weight: float, word_score: float,
                 beam: int) -> None:
        check_lm(lm_url)
        from pipelines.storage import Location

        fs, path = Location(lm_url).filesystem()
        suffix = ".arpa" if path.endswith(".arpa") else ".bin"
        with tempfile.TemporaryDirectory() as folder:  # KenLM opens a local file and reads it whole
            local = os.path.join(folder, "lm" + suffix)
            fs.get_file(path, local)
            self.scorer = KenLMScorer(local)
        self.symbols, self.lm_weight, self.word_score, self.beam = symbols, lm_weight, word_score, beam

    def decode(self, log_probs_TV) -> str:
        return prefix_beam_search(log_probs_TV, self.symbols, self.scorer, lm_weight=self.lm_weight,
                                  word_score=self.word_score, beam=self.beam)
