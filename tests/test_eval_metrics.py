"""Edit distances, error rates, classification scores and the CTC letter vocabulary, by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from d2v_train.eval import ctc
from d2v_train.eval.metrics import (
    accuracy,
    binary_f1,
    edit_distance,
    error_counts,
    matthews_corrcoef,
    topk_correct,
)
from d2v_train.eval.speech_ctc import draw_channel_masks, draw_time_masks


@pytest.mark.parametrize("ref, hyp, expected", [
    ("kitten", "sitting", 3),  # 2 substitutions, 1 insertion
    ("", "", 0),
    ("abc", "", 3),  # all deletions
    ("", "ab", 2),  # all insertions
    ("abc", "abc", 0),
    ("abcd", "acbd", 2),  # a transposition is two edits
    (["THE", "CAT", "SAT"], ["THE", "SAT"], 1),
    (["A"], ["B", "A", "C"], 2),
])
def test_edit_distance_by_hand(ref, hyp, expected):
    assert edit_distance(ref, hyp) == expected
    assert edit_distance(hyp, ref) == expected  # symmetric


def test_error_rates_sum_edits_over_utterances():
    refs = ["THE CAT SAT", "A DOG", "HELLO"]
    hyps = ["THE CAT SAT", "A DOGS RAN", ""]
    counts = error_counts(refs, hyps)
    # words: 0 + (1 sub + 1 ins) + 1 del = 3 edits over 3 + 2 + 1 = 6 words
    assert (counts.word_edits, counts.words) == (3, 6)
    assert counts.wer == pytest.approx(0.5)
    # chars: 0 + "A DOG"->"A DOGS RAN" 5 insertions + "HELLO"->"" 5 deletions over 11 + 5 + 5
    assert (counts.char_edits, counts.chars) == (10, 21)
    assert counts.cer == pytest.approx(10 / 21)  # not the mean of per-utterance rates


def test_empty_hypotheses_and_references():
    assert error_counts(["A B"], [""]).wer == 1.0  # the all-blank baseline
    assert error_counts([""], [""]).wer == 0.0
    assert math.isinf(error_counts([""], ["A"]).wer)
    assert error_counts(["  A   B "], ["A B"]).wer == 0.0  # whitespace is not a word
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_counts(["A", "B"], ["A"])


def test_classification_scores_by_hand():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = np.array([1, 2, 0, 2])
    assert topk_correct(logits, labels, (1, 2, 5)) == {1: 1, 2: 2, 5: 4}
    predictions, truth = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # tp 2, fp 1, fn 1, tn 2
    assert accuracy(predictions, truth) == pytest.approx(4 / 6)
    assert binary_f1(predictions, truth) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(predictions, truth) == pytest.approx((2 * 2 - 1 * 1) / 9)
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # an empty margin
    assert binary_f1([0, 0], [1, 1]) == 0.0


def test_letter_vocabulary_round_trip():
    ids, dropped = ctc.encode_transcript("it's a dog")
    assert [ctc.SYMBOLS[i] for i in ids] == list("IT'S|A|DOG")
    assert dropped == 0 and ctc.BLANK not in ids
    ids, dropped = ctc.encode_transcript("HELLO, WORLD 42 !")
    assert [ctc.SYMBOLS[i] for i in ids] == list("HELLO|WORLD") and dropped == 4
    assert ctc.normalise_reference("Hello, world 42 !") == "HELLO WORLD"


def test_a_vocabulary_from_the_data_keeps_every_character():
    vocab = ctc.Vocabulary.from_transcripts(["Ça va très bien", "ÉTÉ À l'école"])
    assert vocab.kind == "data" and vocab.symbols[:2] == ("<blank>", "|")
    assert set("ÇÉÈÀ'") <= set(vocab.symbols) and "ç" not in vocab.symbols and " " not in vocab.symbols
    ids, dropped = vocab.encode("très été")
    assert dropped == 0 and vocab.greedy_decode(np.array(ids)) == "TRÈS ÉTÉ"
    assert vocab.reference("  très   Été 2! ") == "TRÈS ÉTÉ 2!"  # scored as written: unseen characters count
    letters = ctc.Vocabulary.named("letters", [])
    assert letters.encode("très été") == ([letters.ids[c] for c in "TRS|T"], 3)
    assert letters.reference("très été") == "TRS T"
    with pytest.raises(ValueError, match="--vocab 'words'"):
        ctc.Vocabulary.named("words", [])


class _WordList:
    """A word LM for tests: known words log10 P = -1, others -6; no state."""

    def __init__(self, words):
        self.words = set(words)

    def start(self):
        return None

    def word(self, state, word):
        return (-1.0 if word in self.words else -6.0), state

    def end(self, state):
        return 0.0


def _frames(*rows):
    """Log probabilities over the letters vocabulary from {symbol: probability} rows (rest: blank)."""
    out = np.full((len(rows), len(ctc.SYMBOLS)), 1e-6)
    for t, row in enumerate(rows):
        for symbol, p in row.items():
            out[t, ctc.SYMBOLS.index(symbol)] = p
        out[t, 0] = max(1e-6, 1 - sum(row.values()))
    return np.log(out / out.sum(1, keepdims=True))


def test_the_prefix_beam_search_follows_ctc_and_lets_the_lm_choose_words():
    from d2v_train.eval.lm import prefix_beam_search

    clear = _frames({"C": 0.9}, {"A": 0.9}, {}, {"A": 0.9}, {"|": 0.9}, {"T": 0.9}, {"T": 0.9})
    assert prefix_beam_search(clear, ctc.SYMBOLS) == ctc.greedy_decode(clear.argmax(1)) == "CAA T"
    # the last letter of the second word: Q a little likelier than T
    unsure = _frames({"C": 0.9}, {"A": 0.9}, {"T": 0.9}, {"|": 0.9}, {"C": 0.9}, {"A": 0.9}, {"Q": 0.5, "T": 0.4})
    assert prefix_beam_search(unsure, ctc.SYMBOLS) == "CAT CAQ"  # CTC alone
    lm = _WordList(["CAT"])
    assert prefix_beam_search(unsure, ctc.SYMBOLS, lm, lm_weight=0.5, word_score=0.0) == "CAT CAT"
    assert prefix_beam_search(unsure, ctc.SYMBOLS, lm, lm_weight=0.0, word_score=0.0) == "CAT CAQ"


def test_an_estimated_arpa_model_is_normalised_and_read_by_kenlm(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    from d2v_train.eval.lm import estimate_arpa

    (tmp_path / "lm.arpa").write_text(estimate_arpa(["the cat sat on the mat", "the dog sat", "a cat"], 3))
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    assert model.order == 3
    assert model.score("THE CAT SAT") > model.score("SAT CAT THE") + 1
    start, after = kenlm.State(), kenlm.State()
    model.BeginSentenceWrite(start)
    model.BaseScore(start, "THE", after)
    words = ["THE", "CAT", "SAT", "ON", "MAT", "DOG", "A", "</s>", "<unk>"]
    assert sum(10 ** model.BaseScore(after, w, kenlm.State()) for w in words) == pytest.approx(1.0, abs=1e-5)


def test_greedy_decoding_merges_repeats_and_needs_a_blank_between_double_letters():
    L, O, bar, blank = (ctc.SYMBOLS.index(s) for s in ("L", "O", "|", "<blank>"))
    assert ctc.greedy_decode(np.array([L, L, L, O])) == "LO"
    assert ctc.greedy_decode(np.array([L, blank, L, O, O, blank])) == "LLO"
    assert ctc.greedy_decode(np.array([bar, L, bar, bar, O, bar])) == "L O"
    assert ctc.greedy_decode(np.array([blank, blank])) == ""
    assert ctc.greedy_decode(np.array([], dtype=int)) == ""


def test_time_masks_stay_inside_rows_and_spare_short_ones():
    rng = np.random.default_rng(0)
    frames = np.array([100, 15, 60])
    mask = draw_time_masks(frames, 0.5, 10, rng)
    assert mask.shape == (3, 100)
    assert not mask[1].any()  # shorter than two spans
    assert not mask[2, 60:].any() and mask[2].any() and mask[0].any()
    assert 0.2 < mask[0].mean() < 0.6  # p=0.5 spans overlap
    assert draw_time_masks(frames, 0.0, 10, rng) is None
    assert draw_time_masks(np.array([5, 8]), 0.5, 10, rng) is None
    channels = draw_channel_masks(4, 64, 0.5, 64, rng)
    assert channels.shape == (4, 64) and channels.any()
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, channels[0].astype(int), 0])))[::2]
    assert runs.size and runs.min() >= 16  # span length capped at a quarter of the width, not 64
