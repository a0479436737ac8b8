"""Mask generators: fairseq/BEiT semantics, checked by statistics against plain loop versions."""

import numpy as np
import pytest

from pipelines import masking as mk
from pipelines.masking import (
    bert_replacements,
    compute_block_masks,
    compute_inverse_block_masks,
    compute_inverse_block_masks_1d,
    compute_span_masks,
    compute_token_masks,
    mask_variants,
    span_mask_reference,
)

P, L = 0.65, 10  # data2vec speech: p=0.65, spans of 10 frames


def frames(num_samples):
    """Output length of the wav2vec2 / data2vec feature CNN (50 Hz) for a 16 kHz waveform."""
    n = np.asarray(num_samples)
    for kernel, stride in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:
        n = (n - kernel) // stride + 1
    return n


def utterance_lengths(rng, count):
    return frames((rng.uniform(5, 15, count) * 16000).astype(np.int64))


def test_frames_of_5_and_15_seconds():
    assert frames(5 * 16000) == 249 and frames(15 * 16000) == 749


def test_span_fraction_on_speech_utterances():
    rng = np.random.default_rng(0)
    T = utterance_lengths(rng, 4000)
    M = compute_span_masks(T, P, L, rng)
    assert M.shape == (4000, T.max()) and M.dtype == bool
    assert abs((M.sum(1) / T).mean() - 0.49) < 0.02


# -- agreement with the loop translation of fairseq ------------------------------------------
# For each T, compare N rows of the vectorised masks with N rows of a loop: mean and std of the
# masked fraction, and the marginal P(masked) at every position. Each is a z-score: difference
# over its standard error (two-sample; binomial per position; std of a sample std ~ s/sqrt(2N)).
# Under agreement the largest of ~1500 |z| is 3-4.5 (3.0 with these seeds); we require < 5.
# The seeds are fixed, so the test is deterministic; test_agreement_check_catches_wrong_algorithms
# shows that the same statistics reject two plausible mistakes by a wide margin.

AGREE_T = (249, 499, 749)
AGREE_N = 2000


def _max_z(rows_a, rows_b):
    """Largest |z| over fraction mean, fraction std and per-position masking probability."""
    zs = []
    for a, b in zip(rows_a, rows_b):
        n = len(a)
        fa, fb = a.mean(1), b.mean(1)
        zs.append((fa.mean() - fb.mean()) / np.sqrt((fa.var() + fb.var()) / n))
        zs.append((fa.std() - fb.std()) / np.sqrt((fa.var() + fb.var()) / (2 * n)))
        pa, pb = a.mean(0), b.mean(0)
        pooled = (pa + pb) / 2
        se = np.sqrt(pooled * (1 - pooled) * 2 / n)
        zs.extend(np.where(se > 0, (pa - pb) / np.where(se > 0, se, 1), 0.0))
    return float(np.max(np.abs(zs)))


def _loop_rows(row_fn, seed):
    rng = np.random.default_rng(seed)
    return [np.stack([row_fn(T, rng) for _ in range(AGREE_N)]) for T in AGREE_T]


@pytest.fixture(scope="module")
def vectorised_rows():
    rng = np.random.default_rng(1)
    M = compute_span_masks(np.repeat(AGREE_T, AGREE_N), P, L, rng)
    return [M[i * AGREE_N : (i + 1) * AGREE_N, :T] for i, T in enumerate(AGREE_T)]


def test_span_masks_agree_with_reference_loop(vectorised_rows):
    reference = _loop_rows(lambda T, rng: span_mask_reference(T, P, L, rng), seed=2)
    assert _max_z(vectorised_rows, reference) < 5
    for rows in vectorised_rows:  # fairseq's start range [0, T - L) never reaches the last frame
        assert not rows[:, -1].any()


def _wrong_loop(T, rng, *, replace=False, full_range=False):
    n = max(1, int(P * T / L + rng.random()))
    starts = rng.choice(T if full_range else T - L, n, replace=replace)
    mask = np.zeros(T, dtype=bool)
    for s in starts:
        mask[s : s + L] = True
    return mask


def test_agreement_check_catches_wrong_algorithms(vectorised_rows):
    # starts with replacement lose ~1.6 of 49 spans at T=749 (fraction -0.011): max |z| ~ 15;
    # starts from [0, T) mask the last frame with p ~ 0.065 instead of never: max |z| ~ 37
    with_replacement = _loop_rows(lambda T, rng: _wrong_loop(T, rng, replace=True), seed=3)
    assert _max_z(vectorised_rows, with_replacement) > 7
    whole_range = _loop_rows(lambda T, rng: _wrong_loop(T, rng, full_range=True), seed=4)
    assert _max_z(vectorised_rows, whole_range) > 7


# -- span masks: edge cases ------------------------------------------------------------------


def test_span_positions_beyond_length_are_false():
    rng = np.random.default_rng(5)
    T = np.array([120, 749, 300, 11, 500])
    M = compute_span_masks(T, P, L, rng)
    assert M.shape == (5, 749)
    assert not (M & (np.arange(749) >= T[:, None])).any()
    assert (M.sum(1) > 0).all()


def test_span_same_seed_same_masks_other_seed_differs():
    T = np.array([249, 400, 749])
    a = compute_span_masks(T, P, L, np.random.default_rng(7))
    b = compute_span_masks(T, P, L, np.random.default_rng(7))
    c = compute_span_masks(T, P, L, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_span_min_masks():
    rng = np.random.default_rng(9)
    T = np.full(500, 200)
    none = compute_span_masks(T, 0.0, L, rng, min_masks=0)  # p=0: n = int(u) = 0
    assert not none.any()
    three = compute_span_masks(T, 0.0, L, rng, min_masks=3)  # exactly 3 distinct starts
    counts = three.sum(1)
    assert counts.min() >= L and counts.max() == 3 * L
    starts = three & ~np.pad(three, ((0, 0), (1, 0)))[:, :-1]
    assert (starts.sum(1) <= 3).all()


def test_span_require_same_masks():
    rng = np.random.default_rng(10)
    T = utterance_lengths(rng, 64)
    free = compute_span_masks(T, P, L, np.random.default_rng(11))
    same = compute_span_masks(T, P, L, np.random.default_rng(11), require_same_masks=True)
    counts = same.sum(1)
    assert (counts == counts[0]).all() and counts[0] == free.sum(1).min()
    assert not (same & ~free).any()  # only unmasks


def test_span_row_just_longer_than_a_span():
    # T=11, L=10: n = 1 and T - L <= n, so the start range is [0, 2) as in fairseq
    M = compute_span_masks(np.full(400, 11), P, L, np.random.default_rng(12))
    assert (M.sum(1) == 10).all()
    assert {tuple(np.flatnonzero(~row)) for row in M} == {(0,), (10,)}


def test_span_rows_shorter_than_a_span_behave_like_fairseq():
    # T=5: n = 1, start range [0, 2): s=1 masks frames 1-4, s=0 masks every frame (an error)
    outcomes = {"vectorised": set(), "reference": set()}
    for seed in range(40):
        try:
            row = compute_span_masks([5], P, L, np.random.default_rng(seed))[0]
            outcomes["vectorised"].add(tuple(row))
        except ValueError:
            outcomes["vectorised"].add("full")
        try:
            row = span_mask_reference(5, P, L, np.random.default_rng(seed))
            outcomes["reference"].add(tuple(row))
        except ValueError:
            outcomes["reference"].add("full")
    expected = {(False, True, True, True, True), "full"}
    assert outcomes["vectorised"] == expected and outcomes["reference"] == expected


def test_span_fully_masked_row_is_an_error():
    # T=5, 10 spans: 10 distinct starts from [0, 11) include 0 (masking everything) w.p. 10/11
    with pytest.raises(ValueError, match="fully masked"):
        compute_span_masks(np.full(20, 5), P, L, np.random.default_rng(13), min_masks=10)
    with pytest.raises(ValueError):
        for seed in range(20):
            span_mask_reference(5, P, L, np.random.default_rng(seed), min_masks=10)


def test_span_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        compute_span_masks([[10, 20]], P, L, rng)
    with pytest.raises(ValueError):
        compute_span_masks([100], 1.5, L, rng)
    assert compute_span_masks([], P, L, rng).shape == (0, 0)


def test_choice_helper_is_uniform():
    """The sampler behind every mask: k distinct positions, uniform over a ragged pool."""
    rng = np.random.default_rng(14)
    pool = np.zeros((20000, 12), dtype=bool)
    pool[:, [0, 2, 3, 5, 7, 8, 11]] = True  # 7 candidates
    for k in (2, 6):  # k=6 of 7 also exercises the sort fallback
        picked = mk._distinct_uniform(np.full(20000, k), np.full(20000, 12), 12, rng, pool)
        assert (picked.sum(1) == k).all() and not (picked & ~pool).any()
        p = k / 7
        marginal = picked[:, pool[0]].mean(0)
        assert np.abs(marginal - p).max() < 5 * np.sqrt(p * (1 - p) / 20000)


# -- vision ----------------------------------------------------------------------------------


def test_beit_block_masks():
    M = compute_block_masks(2000, np.random.default_rng(15))
    counts = M.sum(1)
    assert M.shape == (2000, 196)
    assert 119 <= counts.mean() <= 120
    assert counts.min() >= 100 and counts.max() <= 120


def test_beit_masks_are_blocks():
    M = compute_block_masks(200, np.random.default_rng(16)).reshape(200, 14, 14)
    neighbour = np.zeros_like(M)
    neighbour[:, 1:] |= M[:, :-1]
    neighbour[:, :-1] |= M[:, 1:]
    neighbour[:, :, 1:] |= M[:, :, :-1]
    neighbour[:, :, :-1] |= M[:, :, 1:]
    assert (neighbour & M).sum() / M.sum() > 0.95  # rectangles of >= 2 patches per side


def _kept_with_kept_neighbour(kept_BHW):
    nb = np.zeros_like(kept_BHW)
    nb[:, 1:] |= kept_BHW[:, :-1]
    nb[:, :-1] |= kept_BHW[:, 1:]
    nb[:, :, 1:] |= kept_BHW[:, :, :-1]
    nb[:, :, :-1] |= kept_BHW[:, :, 1:]
    return (nb & kept_BHW).sum() / kept_BHW.sum()


def test_inverse_block_masks_exact_count_and_blocks():
    M = compute_inverse_block_masks(2000, np.random.default_rng(17))
    assert M.shape == (2000, 196)
    assert (M.sum(1) == 157).all()  # int(196 * 0.2) = 39 kept
    # kept patches come in 3x3 blocks: ~95% have a kept neighbour (39 random ones: ~55%)
    assert _kept_with_kept_neighbour(~M.reshape(-1, 14, 14)) > 0.85


def test_inverse_block_masks_1d_exact_count():
    rng = np.random.default_rng(18)
    T = np.concatenate([utterance_lengths(rng, 500), [7, 1, 0, 250, 251]])
    M = compute_inverse_block_masks_1d(T, rng)  # blocks masked (released audio config)
    assert M.shape == (505, T.max())
    assert (M.sum(1) == (T * 0.5).astype(int)).all()
    assert not (M & (np.arange(T.max()) >= T[:, None])).any()
    inv = compute_inverse_block_masks_1d(T, rng, inverse=True)  # blocks kept
    assert (inv.sum(1) == T - (T * 0.5).astype(int)).all()
    assert not (inv & (np.arange(T.max()) >= T[:, None])).any()


def test_inverse_block_masks_1d_are_blocks():
    M = compute_inverse_block_masks_1d(np.full(2000, 500), np.random.default_rng(19))
    runs = (np.diff(M.astype(np.int8), axis=1) == 1).sum(1) + M[:, 0]
    assert runs.mean() < 80  # 250 masked in runs of >= 5; uniformly random would give ~125


def test_block_masks_deterministic():
    for fn in (compute_block_masks, compute_inverse_block_masks):
        a, b = fn(50, np.random.default_rng(3)), fn(50, np.random.default_rng(3))
        assert np.array_equal(a, b) and not np.array_equal(a, fn(50, np.random.default_rng(4)))


# -- text ------------------------------------------------------------------------------------


def test_token_masks_bert():
    rng = np.random.default_rng(20)
    T = rng.integers(3, 513, 4000)
    M = compute_token_masks(T, 0.15, rng)
    assert not M[:, 0].any() and not M[np.arange(4000), T - 1].any()
    assert not (M & (np.arange(T.max()) >= T[:, None])).any()
    assert abs(M.sum() / (T - 2).sum() - 0.15) < 0.005
    # ends can be masked when not excluded
    free = compute_token_masks(np.full(4000, 20), 0.15, rng, exclude_ends=False)
    assert free[:, 0].any() and free[:, -1].any()


def test_token_masks_spans():
    rng = np.random.default_rng(21)
    T = np.full(4000, 512)
    M = compute_token_masks(T, 0.35, rng, span_length=4)
    assert not M[:, 0].any() and not M[:, -1].any()
    # 35% in spans of 4 is int(0.35 * 510 / 4 + u) ~ 45 starts; overlaps leave ~31% masked
    assert abs(M.mean(1).mean() * 512 / 510 - 0.31) < 0.01
    assert compute_token_masks([2, 1, 0, 4], 0.35, rng, span_length=4).shape == (4, 4)


def test_bert_replacements_80_10_10():
    rng = np.random.default_rng(22)
    vocab, mask_id, specials = 1000, 999, (0, 1, 2, 3)
    tokens = rng.integers(4, 999, size=(400, 512))
    mask = compute_token_masks(np.full(400, 512), 0.5, rng)
    out, target = bert_replacements(tokens, mask, rng, vocab_size=vocab, mask_token_id=mask_id,
                                    special_ids=specials, return_targets=True)
    assert np.array_equal(out[~mask], tokens[~mask])
    assert np.array_equal(target, out == mask_id)
    n = mask.sum()
    changed = mask & (out != tokens) & ~target
    kept = mask & (out == tokens)
    tol = 5 * np.sqrt(0.1 * 0.9 / n)  # ~0.004 for n ~ 100k
    assert abs(target.sum() / n - 0.8) < tol * 4 / 3
    # a random id equals the original w.p. 1/995, so "kept" slightly exceeds 10%
    assert abs(changed.sum() / n - 0.1) < tol and abs(kept.sum() / n - 0.1) < tol
    random_ids = out[changed]
    assert not np.isin(random_ids, specials + (mask_id,)).any()
    assert len(np.unique(random_ids)) > 900
    plain = bert_replacements(tokens, mask, np.random.default_rng(1), vocab_size=vocab,
                              mask_token_id=mask_id, random_prob=0.0, leave_prob=0.0)
    assert np.array_equal(plain == mask_id, mask)


# -- variants for the shard builder ----------------------------------------------------------


def test_mask_variants_shapes_and_independence():
    rng = np.random.default_rng(23)
    T = np.array([249, 300, 749])
    cases = {
        "span": (T, dict(mask_prob=P, mask_length=L)),
        "inverse_block_1d": (T, {}),
        "token": (np.array([20, 512, 100]), dict(mask_prob=0.15)),
        "block": (np.full(3, 196), {}),
        "inverse_block": (np.full(3, 196), {}),
    }
    for kind, (lengths, params) in cases.items():
        out = mask_variants(kind, lengths, 4, rng, **params)
        assert [v.shape for v in out] == [(4, t) for t in lengths], kind
        assert all(v.dtype == bool and v.flags.c_contiguous for v in out)
        assert all(len({v[i].tobytes() for i in range(4)}) == 4 for v in out), kind


def test_mask_variants_same_masks_within_each_sample():
    rng = np.random.default_rng(24)
    out = mask_variants("span", [249, 749], 8, rng, mask_prob=P, mask_length=L,
                        require_same_masks=True)
    for v in out:
        assert len(set(v.sum(1))) == 1
    assert out[0].sum(1)[0] != out[1].sum(1)[0]


def test_mask_variants_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        mask_variants("block", [196, 100], 2, rng)
    with pytest.raises(ValueError):
        mask_variants("nope", [10], 2, rng)
    with pytest.raises(TypeError):
        mask_variants("span", [100], 2, rng, mask_prob=P)
