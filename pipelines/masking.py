"""Mask generators for data2vec pre-training (speech spans, BEiT blocks, data2vec 2.0 inverse
blocks, BERT tokens).

Pure numpy, seeded by the caller's ``np.random.Generator`` and vectorised across rows, so a shard
builder can draw every mask variant of a shard in one call. ``True`` always means *masked* (the
student does not see the position); positions at or beyond a row's length are always ``False``.
Semantics follow fairseq / BEiT; deviations are listed in each function's docstring.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "compute_span_masks",
    "span_mask_reference",
    "compute_block_masks",
    "compute_inverse_block_masks",
    "compute_inverse_block_masks_1d",
    "compute_token_masks",
    "bert_replacements",
    "mask_variants",
]


def _as_lengths(lengths) -> np.ndarray:
    T_B = np.asarray(lengths, dtype=np.int64)
    if T_B.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {T_B.shape}")
    if T_B.size and T_B.min() < 0:
        raise ValueError("lengths must be non-negative")
    return T_B


def _choose_sorted(valid_BM: np.ndarray, k_B: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exactly k_B[i] of row i's ``valid`` positions, uniformly without replacement, for any k.

    Random keys, the k-th smallest per row as threshold; float64 keys make ties negligible.
    """
    B, M = valid_BM.shape
    if B == 0 or M == 0:
        return np.zeros((B, M), dtype=bool)
    keys = rng.random((B, M))
    keys[~valid_BM] = 2.0
    kth = np.sort(keys, axis=1)[np.arange(B), np.clip(k_B - 1, 0, M - 1)]
    return (keys <= np.where(k_B > 0, kth, -1.0)[:, None]) & valid_BM


def _distinct_uniform(n_B, R_B, width: int, rng, pool_BW=None) -> np.ndarray:
    """Bool (B, width): n_B[i] distinct values uniform over [0, R_B[i]) per row, or over the
    True positions of ``pool_BW`` there.

    The first n distinct in-pool values of an i.i.d. uniform sequence form a uniform n-subset, so
    a few more than n draws and a sort of those replace a sort over every candidate (about 5x
    faster for speech spans). Rows that drew too few fall back to ``_choose_sorted``.
    """
    B = n_B.size
    S_BW = np.zeros((B, width), dtype=bool)
    if B == 0 or n_B.max() == 0:
        return S_BW
    need_B = n_B + n_B // 8 + 6
    if pool_BW is not None:  # more draws where the pool is sparse: out-of-pool draws are dropped
        pool_B = np.count_nonzero(pool_BW, axis=1)
        need_B = np.where(n_B > 0, need_B * R_B // np.maximum(pool_B, 1) + 1, 0)
    m = int(min(need_B.max(), 4 * width + 64))
    shift = m.bit_length()
    itype = np.int32 if max((width + 1) << shift, B * width) < 2**31 else np.int64
    draws_BM = (rng.random((B, m)) * np.maximum(R_B, 1)[:, None]).astype(itype)
    if pool_BW is not None:
        draws_BM[~np.take_along_axis(pool_BW, draws_BM, axis=1)] = width
    # sort by (value, draw index): the head of each run of equal values is its first draw
    key_BM = np.sort((draws_BM << shift) | np.arange(m, dtype=itype), axis=1)
    value_BM = key_BM >> shift
    head_BM = value_BM < width
    head_BM[:, 1:] &= value_BM[:, 1:] != value_BM[:, :-1]
    # keep the heads drawn no later than the n-th head in draw order
    order_BM = np.where(head_BM, key_BM & ((1 << shift) - 1), m)
    nth_B = np.sort(order_BM, axis=1)[np.arange(B), np.clip(n_B - 1, 0, m - 1)]
    taken_BM = head_BM & (order_BM <= nth_B[:, None]) & (n_B > 0)[:, None]
    flat_BM = value_BM + (np.arange(B, dtype=itype) * width)[:, None]
    S_BW.reshape(-1)[np.compress(taken_BM.ravel(), flat_BM.ravel())] = True
    short = np.flatnonzero(np.count_nonzero(taken_BM, axis=1) < n_B)
    if short.size:
        valid = np.arange(width) < R_B[short, None]
        if pool_BW is not None:
            valid &= pool_BW[short]
        S_BW[short] = _choose_sorted(valid, n_B[short], rng)
    return S_BW


def _force_count(blk_BT: np.ndarray, target_B: np.ndarray, valid_BT: np.ndarray, rng) -> np.ndarray:
    """Flip uniformly random positions so each row has exactly target_B[i] True (fairseq's
    ``require_same_masks``: drop from the set, or add from the valid positions outside it)."""
    delta_B = np.count_nonzero(blk_BT, axis=1) - target_B
    if not delta_B.any():
        return blk_BT
    B, T = blk_BT.shape
    pool_BT = np.where(delta_B[:, None] > 0, blk_BT, valid_BT & ~blk_BT)
    flip = _distinct_uniform(np.abs(delta_B), np.full(B, T), T, rng, pool_BT)
    return blk_BT ^ flip


def _cover(S_BW: np.ndarray, length: int) -> np.ndarray:
    """Grow every True at column s to [s, s + length): O(log length) shifted ORs.

    Works on the flattened array (contiguous, ~40% faster than row-wise slices), so every row
    must end with ``length - 1`` columns holding no True; a span then never spills into the
    next row. May reuse (and modify) ``S_BW``.
    """
    out, done, cur, span = None, 0, S_BW.reshape(-1), 1
    while True:
        if length & span:
            if out is None:
                out = cur
            elif done < out.size:
                out[done:] |= cur[: cur.size - done]
            done += span
        if 2 * span > length:
            return out.reshape(S_BW.shape)
        nxt = np.empty_like(cur)
        nxt[:span] = cur[:span]
        np.bitwise_or(cur[span:], cur[: cur.size - span], out=nxt[span:])
        cur, span = nxt, 2 * span


def _span_rows(T_B, mask_prob, mask_length, rng, min_masks, group=None) -> np.ndarray:
    """fairseq ``compute_mask_indices`` (static lengths) for every row at once; no full-mask check.

    ``group``: equalise the masked count to the minimum within consecutive groups of that many
    rows (``require_same_masks``), by unmasking uniformly random positions.
    """
    B, T_max = T_B.size, int(T_B.max(initial=0))
    n_B = np.floor(mask_prob * T_B / mask_length + rng.random(B)).astype(np.int64)
    n_B = np.maximum(min_masks, n_B)
    # fairseq: starts from [0, T - L); when T - L <= n the range becomes [0, n + 1)
    R_B = np.maximum(T_B - mask_length, n_B + 1)
    # starts are < R, so R + L - 1 columns leave _cover its spill room; usually that is T_max
    width = max(T_max, int(R_B.max(initial=0)) + mask_length - 1)
    M_BT = _cover(_distinct_uniform(n_B, R_B, width, rng), mask_length)
    if width > T_max:
        M_BT = np.ascontiguousarray(M_BT[:, :T_max])
    # only rows whose start range grew can reach past T - 1
    grown = np.flatnonzero(R_B > T_B - mask_length)
    M_BT[grown] &= np.arange(T_max) < T_B[grown, None]
    if group:
        count_B = np.count_nonzero(M_BT, axis=1)
        target_B = np.repeat(count_B.reshape(-1, group).min(axis=1), group)
        M_BT = _force_count(M_BT, target_B, M_BT, rng)
    return M_BT


def compute_span_masks(
    lengths,
    mask_prob: float,
    mask_length: int,
    rng: np.random.Generator,
    *,
    min_masks: int = 1,
    require_same_masks: bool = False,
) -> np.ndarray:
    """Speech span masks, bool (B, max(lengths)): fairseq ``compute_mask_indices`` per row.

    n = max(min_masks, int(p*T/L + u)) distinct starts from [0, T - L) (from [0, n + 1) when
    T - L <= n, as fairseq), spans [s, s + L) clipped to T; overlaps make p=0.65, L=10 mask ~49%.
    Like fairseq, the last frame is never masked unless T - L <= n, and a row with T <= L can
    end fully masked: any fully masked row raises ``ValueError`` (data2vec drops utterances
    under 2 s, i.e. under ~100 frames, so real crops never hit it).
    """
    T_B = _as_lengths(lengths)
    if not 0.0 <= mask_prob <= 1.0 or mask_length < 1:
        raise ValueError(f"need 0 <= mask_prob <= 1, mask_length >= 1: {mask_prob}, {mask_length}")
    return _span_variants(T_B, T_B.size, rng, mask_prob=mask_prob, mask_length=mask_length,
                          min_masks=min_masks, require_same_masks=require_same_masks)


def span_mask_reference(length: int, mask_prob, mask_length, rng, min_masks=1) -> np.ndarray:
    """One row of fairseq's span masking as a plain loop: the baseline for tests and benchmarks."""
    n = max(min_masks, int(mask_prob * length / float(mask_length) + rng.random()))
    start_range = length - mask_length
    if start_range <= n:
        start_range = n + 1
    starts = rng.choice(start_range, n, replace=False)
    idx = np.asarray([s + o for s in starts for o in range(mask_length)], dtype=np.int64)
    idx = np.unique(idx[idx < length])
    if len(idx) >= length:
        raise ValueError(f"the whole row of length {length} is masked")
    mask = np.zeros(length, dtype=bool)
    mask[idx] = True
    return mask


def compute_block_masks(
    num_rows: int,
    rng,
    *,
    grid=(14, 14),
    num_masking_patches=120,
    min_num_patches=16,
    max_num_patches=None,
    min_aspect=0.3,
    max_aspect=None,
) -> np.ndarray:
    """BEiT block masking (data2vec v1 vision), bool (num_rows, H*W).

    Until ``num_masking_patches`` are masked: area ~ U[min, remaining], aspect log-uniform,
    block round(sqrt(area*r)) x round(sqrt(area/r)) at a uniform position, accepted if it adds
    1..remaining new patches; a row stops after 10 failed tries in a row (so it may end short).
    All rows advance together, one try per loop step.
    """
    H, W = grid
    cap_block = num_masking_patches if max_num_patches is None else max_num_patches
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect or 1 / min_aspect)
    M_BHW = np.zeros((num_rows, H, W), dtype=bool)
    count_B = np.zeros(num_rows, dtype=np.int64)
    fails_B = np.zeros(num_rows, dtype=np.int64)
    rows_H, cols_W = np.arange(H), np.arange(W)
    live = np.flatnonzero(count_B < num_masking_patches)
    while live.size:
        n = live.size
        cap = np.minimum(num_masking_patches - count_B[live], cap_block)
        area = min_num_patches + (cap - min_num_patches) * rng.random(n)
        ratio = np.exp(log_lo + (log_hi - log_lo) * rng.random(n))
        h = np.rint(np.sqrt(area * ratio)).astype(np.int64)
        w = np.rint(np.sqrt(area / ratio)).astype(np.int64)
        fits = (h < H) & (w < W)
        h, w = np.minimum(h, H - 1), np.minimum(w, W - 1)
        top = (rng.random(n) * (H - h + 1)).astype(np.int64)
        left = (rng.random(n) * (W - w + 1)).astype(np.int64)
        M = M_BHW[live]
        integral = np.zeros((n, H + 1, W + 1), dtype=np.int64)
        integral[:, 1:, 1:] = M.cumsum(axis=1).cumsum(axis=2)
        r = np.arange(n)
        inside = (integral[r, top + h, left + w] - integral[r, top, left + w]
                  - integral[r, top + h, left] + integral[r, top, left])
        new = h * w - inside
        ok = fits & (new > 0) & (new <= cap)
        rect = (((rows_H >= top[:, None]) & (rows_H < (top + h)[:, None]))[:, :, None]
                & ((cols_W >= left[:, None]) & (cols_W < (left + w)[:, None]))[:, None, :])
        M_BHW[live] = M | (rect & ok[:, None, None])
        count_B[live] += np.where(ok, new, 0)
        fails_B[live] = np.where(ok, 0, fails_B[live] + 1)
        live = live[(count_B[live] < num_masking_patches) & (fails_B[live] < 10)]
    return M_BHW.reshape(num_rows, H * W)


def compute_inverse_block_masks(
    num_rows: int,
    rng,
    *,
    grid=(14, 14),
    mask_prob=0.8,
    block_size=3,
    mask_prob_adjust=0.07,
) -> np.ndarray:
    """data2vec 2.0 image masking (fairseq ``compute_block_mask_2d``, inverse_mask=True),
    bool (num_rows, H*W).

    int(H*W*(1 - p + adjust) / bs**2) centres uniform with replacement, each a bs x bs *kept*
    block (clipped at the border); then exactly int(H*W*(1 - p)) kept (39 of 196, i.e. 157
    masked). ``mask_prob_adjust`` 0.07 is the released base image config (5 centres).
    """
    H, W = grid
    L = H * W
    keep = 1 - mask_prob
    n_centres = int(L * ((keep + mask_prob_adjust) / block_size**2))
    centre = rng.integers(0, L, size=(num_rows, n_centres))
    offs = np.arange(block_size) - block_size // 2
    i = np.clip((centre // W)[..., None] + offs, 0, H - 1)
    j = np.clip((centre % W)[..., None] + offs, 0, W - 1)
    flat = (i[..., :, None] * W + j[..., None, :]).reshape(num_rows, -1)
    kept = np.zeros((num_rows, L), dtype=bool)
    kept[np.arange(num_rows)[:, None], flat] = True
    target = np.full(num_rows, int(L * keep))
    kept = _force_count(kept, target, np.ones_like(kept), rng)
    return ~kept


def compute_inverse_block_masks_1d(
    lengths,
    rng,
    *,
    mask_prob=0.5,
    block_size=5,
    mask_prob_adjust=0.05,
    inverse=False,
) -> np.ndarray:
    """data2vec 2.0 audio masking (fairseq ``compute_block_mask_1d``), bool (B, max(lengths)).

    With q = 1 - p if ``inverse`` else p: int(T * (q + adjust) / bs) centres uniform in [0, T)
    with replacement, each grown to [c - bs//2, c - bs//2 + bs) clipped to the row, then
    exactly int(T * q) block positions per row. inverse=False (the released base audio config:
    blocks are masked): exactly int(T * p) masked. inverse=True (blocks are kept):
    exactly T - int(T * (1 - p)) masked.
    """
    T_B = _as_lengths(lengths)
    B, T_max = T_B.size, int(T_B.max(initial=0))
    q = 1 - mask_prob if inverse else mask_prob
    n_B = (T_B * ((q + mask_prob_adjust) / block_size)).astype(np.int64)
    m = int(n_B.max(initial=0))
    centre_BM = (rng.random((B, m)) * T_B[:, None]).astype(np.int64)
    # a block starts bs//2 before its centre: mark starts in columns shifted right by bs//2,
    # grow them, and cut the shift off again (clipping the block to the row)
    pad, width = block_size // 2, T_max + block_size - 1
    S = np.zeros((B, width), dtype=bool)
    live_BM = np.arange(m) < n_B[:, None]
    flat_BM = centre_BM + np.arange(B)[:, None] * width
    S.reshape(-1)[np.compress(live_BM.ravel(), flat_BM.ravel())] = True
    valid_BT = np.arange(T_max) < T_B[:, None]
    blk = _cover(S, block_size)[:, pad : pad + T_max] & valid_BT
    blk = _force_count(blk, (T_B * q).astype(np.int64), valid_BT, rng)
    return valid_BT & ~blk if inverse else blk


def compute_token_masks(
    lengths,
    mask_prob: float,
    rng,
    *,
    span_length: int = 1,
    exclude_ends: bool = True,
    min_masks: int = 0,
) -> np.ndarray:
    """Text masks, bool (B, max(lengths)); with ``exclude_ends`` positions 0 and T-1 (<s>, </s>)
    are never masked, and the N = T - 2 positions between them are the maskable range.

    span_length=1: int(p*N + u) distinct positions (fairseq MaskTokensDataset).
    span_length>1: the speech span rule over the maskable range (starts from [0, N - L), see
    ``compute_span_masks``); fairseq's MaskTokensDataset draws starts from [0, N) instead. Spans
    overlap, so p=0.35 in spans of 4 masks ~31%. A fully masked short block is not an error.
    """
    T_B = _as_lengths(lengths)
    end = 1 if exclude_ends else 0
    N_B = np.maximum(T_B - 2 * end, 0)
    if span_length == 1:
        n_B = np.floor(mask_prob * N_B + rng.random(T_B.size)).astype(np.int64)
        n_B = np.minimum(np.maximum(min_masks, n_B), N_B)
        inner = _distinct_uniform(n_B, N_B, int(N_B.max(initial=0)), rng)
    else:
        inner = _span_rows(N_B, mask_prob, span_length, rng, min_masks)
    M_BT = np.zeros((T_B.size, int(T_B.max(initial=0))), dtype=bool)
    M_BT[:, end : end + inner.shape[1]] = inner
    return M_BT


def bert_replacements(
    tokens,
    mask,
    rng,
    *,
    vocab_size: int,
    mask_token_id: int,
    random_prob=0.1,
    leave_prob=0.1,
    special_ids=(),
    return_targets: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The student's input tokens: each masked position independently becomes <mask>
    (1 - random_prob - leave_prob), a uniform random non-special id (random_prob), or stays.

    data2vec text regresses only the positions that became <mask>: ``return_targets=True``
    also returns that bool array. Random ids never equal ``mask_token_id`` (fairseq could draw
    it), so ``student == mask_token_id`` identifies the targets too.
    """
    tokens = np.asarray(tokens)
    mask = np.asarray(mask, dtype=bool)
    if tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} differ in shape")
    u = rng.random(tokens.shape)
    rand = mask & (u < random_prob)
    target = mask & (u >= random_prob + leave_prob)
    out = tokens.copy()
    out[target] = mask_token_id
    allowed = np.setdiff1d(np.arange(vocab_size), [*special_ids, mask_token_id])
    out[rand] = allowed[rng.integers(0, allowed.size, size=int(rand.sum()))]
    return (out, target) if return_targets else out


def _span_variants(T_B, k, rng, *, mask_prob, mask_length, min_masks=1, require_same_masks=False):
    """Span masks with ``require_same_masks`` applied within groups of k consecutive rows."""
    M_BT = _span_rows(T_B, mask_prob, mask_length, rng, min_masks,
                      group=k if require_same_masks and T_B.size else None)
    # a full row has its last frame masked, which only rows with a grown start range can have
    last_B = T_B == 0
    has = np.flatnonzero(T_B > 0)
    last_B[has] = M_BT[has, T_B[has] - 1]
    maybe = np.flatnonzero(last_B)
    full = maybe[np.count_nonzero(M_BT[maybe], axis=1) >= T_B[maybe]]
    if full.size:
        rows = full[:8].tolist()
        raise ValueError(f"rows {rows} (lengths {T_B[rows].tolist()}) are fully masked")
    return M_BT


def mask_variants(kind: str, lengths, k: int, rng, **params) -> list[np.ndarray]:
    """For each row length T_i, a bool (k, T_i) array of k independent masks, drawn in one call.

    For "span", ``require_same_masks`` equalises within each row's k variants (as fairseq does
    for a clone batch), not across the shard. "block" and "inverse_block" need every length to
    be H*W of ``grid``.
    """
    T_N = _as_lengths(lengths)
    rep = np.repeat(T_N, k)
    if kind == "span":
        M = _span_variants(rep, k, rng, **params)
    elif kind in ("block", "inverse_block"):
        H, W = params.get("grid", (14, 14))
        if np.any(T_N != H * W):
            raise ValueError(f"{kind} masks need every length to be {H * W}")
        fn = compute_block_masks if kind == "block" else compute_inverse_block_masks
        M = fn(rep.size, rng, **params)
    elif kind == "inverse_block_1d":
        M = compute_inverse_block_masks_1d(rep, rng, **params)
    elif kind == "token":
        M = compute_token_masks(rep, rng=rng, **params)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return [np.ascontiguousarray(M[i * k : (i + 1) * k, :T]) for i, T in enumerate(T_N)]
