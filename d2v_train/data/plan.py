"""Epoch plans: which samples form each global batch, and every random choice, from metadata alone.

The plan is a pure function of (index, policy, seed, epoch). Order: shuffle the shard order, then
the samples within blocks of `shuffle_block` consecutive shards (locality: a block's reads stay in
a few tars). Speech batches fill a token budget (fairseq's rule: members x longest <= max_tokens)
from length-sorted samples of a block, are cropped to their shortest member at random offsets
that are multiples of the frame hop, and are shuffled within the block. Images and text use a
fixed batch size. Global batch g goes to rank g mod world_size.

Tail policy: every rank gets the same number of batches. With `tail="drop"` (default) the last
(remaining batches mod world_size) global batches of an epoch are not served; with "pad" the
missing ones repeat batches from the start of the epoch, flagged as padding.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from d2v_train.data.index import SplitIndex


@dataclass(frozen=True)
class BatchPolicy:
    batch_size: int | None = None  # images, text (and speech evaluation, if set)
    max_tokens: int | None = None  # speech: audio samples per batch
    min_sample_size: int = 32_000  # speech: shorter utterances are left out of training plans
    max_sample_size: int = 320_000  # speech: longer ones are cropped to this
    shuffle: bool = True  # False: dataset order (evaluation)
    crop: bool = True  # speech: crop to the shortest member; False pads (evaluation: every frame scored)
    shuffle_block: int = 4  # shards per shuffle block
    tail: Literal["drop", "pad"] = "drop"

    def __post_init__(self) -> None:
        check_batch_settings(batch_size=self.batch_size, max_tokens=self.max_tokens,
                             min_sample_size=self.min_sample_size, max_sample_size=self.max_sample_size,
                             shuffle_block=self.shuffle_block, tail=self.tail)


def check_batch_settings(*, batch_size: int | None, max_tokens: int | None, min_sample_size: int,
                         max_sample_size: int, shuffle_block: int, tail: str = "drop", prefix: str = "") -> None:
    """The one check of a batch plan's settings, for BatchPolicy and the trainer's DataConfig;
    `prefix` names the fields as the caller's users know them (`data.`)."""
    p = prefix
    if (batch_size is None) == (max_tokens is None):
        raise ValueError(f"give exactly one of {p}batch_size and {p}max_tokens (speech)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"{p}batch_size must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"{p}max_tokens must be positive")
    if not 1 <= min_sample_size <= max_sample_size:
        raise ValueError(f"{p}max_sample_size ({max_sample_size}) must be at least {p}min_sample_size "
                         f"({min_sample_size}), which must be positive")
    if shuffle_block < 1:
        raise ValueError(f"{p}shuffle_block must be at least 1")
    if tail not in ("drop", "pad"):
        raise ValueError(f"{p}tail must be 'drop' or 'pad', not {tail!r}")


@dataclass(frozen=True)
class GlobalBatch:
    number: int  # position in the epoch's plan
    samples: np.ndarray  # positions in the SplitIndex
    crop_length: int | None = None  # speech training: every member cropped to this many samples
    crop_offsets: np.ndarray | None = None  # speech training: start of each member's crop (multiple of hop)
    padding: bool = False  # a repeated batch that only fills the tail (tail="pad")


def _rng(seed: int, epoch: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *salt])


def epoch_blocks(index: SplitIndex, policy: BatchPolicy, seed: int, epoch: int) -> list[np.ndarray]:
    """Sample positions per shuffle block, in the epoch's order."""
    shard_of = index.columns["shard"]
    shards = np.arange(len(index.shards))
    if policy.shuffle:
        shards = _rng(seed, epoch, 1).permutation(shards)
    rows_of = _rows_by_shard(shard_of, len(index.shards))
    times = index.multiplicity(seed, epoch)  # a mix's weights and repeats: how often each row appears
    if times is not None:
        rows_of = [np.repeat(rows, times[rows]) for rows in rows_of]
    blocks = []
    for start in range(0, len(shards), policy.shuffle_block):
        members = np.concatenate([rows_of[s] for s in shards[start: start + policy.shuffle_block]] or [np.zeros(0, int)])
        if policy.shuffle:
            members = _rng(seed, epoch, 2, start).permutation(members)
        blocks.append(members.astype(np.int64))
    return blocks


def _rows_by_shard(shard_of: np.ndarray, count: int) -> list[np.ndarray]:
    order = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[order], np.arange(count + 1))
    return [order[bounds[i]: bounds[i + 1]] for i in range(count)]


class EpochPlan(Sequence):
    """An epoch's global batches in serving order, made on demand from two arrays: the sample
    positions in serving order and where each batch starts among them. Speech crops are drawn
    when a batch is asked for (each from its own seeded generator), so an epoch of 10 million
    samples is planned without a Python object per batch; `plan[g]` is global batch g."""

    def __init__(self, index: SplitIndex, policy: BatchPolicy, seed: int, epoch: int, hop: int,
                 samples: np.ndarray, starts: np.ndarray) -> None:
        self.lengths, self.policy, self.seed, self.epoch, self.hop = index.lengths, policy, seed, epoch, hop
        self.samples, self.starts = samples, starts
        self.crop = index.modality == "speech" and policy.crop

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, number):
        if isinstance(number, slice):
            return [self[g] for g in range(*number.indices(len(self)))]
        g = int(number)
        if g < 0:
            g += len(self)
        if not 0 <= g < len(self):
            raise IndexError(f"global batch {number} of an epoch of {len(self)}")
        group = self.samples[self.starts[g]: self.starts[g + 1]]
        if not self.crop:
            return GlobalBatch(g, group)
        length, offsets = _crops(self.lengths[group], self.policy, self.hop, _rng(self.seed, self.epoch, 4, g))
        return GlobalBatch(g, group, length, offsets)


def plan_epoch(index: SplitIndex, policy: BatchPolicy, seed: int, epoch: int, *, hop: int = 320) -> EpochPlan:
    """Every global batch of the epoch, numbered in serving order. Columnar: a loop over shuffle
    blocks, never over samples or batches."""
    blocks = epoch_blocks(index, policy, seed, epoch)
    if policy.max_tokens is not None:
        blocks, ends = _token_budget_ends(index, blocks, policy)
    else:
        ends = [np.minimum(np.arange(policy.batch_size, len(b) + policy.batch_size, policy.batch_size), len(b))
                for b in blocks]
    pieces, sizes = [], []
    for block_number, (block, block_ends) in enumerate(zip(blocks, ends)):
        group_starts = np.concatenate([[0], block_ends[:-1]]).astype(np.int64)
        group_sizes = block_ends - group_starts
        if policy.shuffle and policy.max_tokens is not None:
            order = _rng(seed, epoch, 3, block_number).permutation(len(group_sizes))
            group_starts, group_sizes = group_starts[order], group_sizes[order]
        # each group's positions in the block, groups in serving order
        within = np.arange(int(group_sizes.sum())) + np.repeat(group_starts - (np.cumsum(group_sizes) - group_sizes),
                                                               group_sizes)
        pieces.append(block[within])
        sizes.append(group_sizes)
    sizes_all = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes_all)]).astype(np.int64)
    return EpochPlan(index, policy, seed, epoch, hop, samples.astype(np.int64, copy=False), starts)


def _token_budget_ends(index: SplitIndex, blocks: list[np.ndarray],
                       policy: BatchPolicy) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each block sorted by length (training: short utterances left out, long ones counted at
    max_sample_size), and the ends of its batches under fairseq's rule, members x longest <=
    max_tokens (a longer one alone), filled greedily from the shortest. The greedy fill runs for
    all blocks at once: one step per batch of the longest block, not one per sample."""
    sorted_blocks, sorted_lengths = [], []
    for block in blocks:
        lengths = index.lengths[block]
        if policy.crop:  # training: short utterances are left out, long ones are cropped
            keep = lengths >= policy.min_sample_size
            block, lengths = block[keep], np.minimum(lengths[keep], policy.max_sample_size)
        # Sorting by length keeps members alike (little is cropped away); the stable sort keeps the
        # block's shuffled order among equal lengths.
        order = np.argsort(lengths, kind="stable")
        sorted_blocks.append(block[order])
        sorted_lengths.append(lengths[order].astype(np.int64))
    counts = np.array([len(b) for b in sorted_blocks], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    last = first + counts  # each block's end in the joined arrays
    lengths = np.concatenate(sorted_lengths) if sorted_lengths else np.zeros(0, np.int64)
    ends = greedy_group_ends(lengths, first, last, policy.max_tokens)
    return sorted_blocks, [e - f for e, f in zip(ends, first)]


def greedy_group_ends(lengths: np.ndarray, first: np.ndarray, last: np.ndarray, budget: int) -> list[np.ndarray]:
    """For segments [first[b], last[b]) of ascending `lengths`: the ends of the groups that start at
    first[b] and each take the most members m with m x their longest <= budget (at least one),
    as positions in `lengths`; one array per segment. Vectorised over segments: each step finds
    every segment's next end by bisection (m x longest grows with m, so the members that fit are
    a prefix, of at most budget // shortest)."""
    starts = first.copy()
    found: list[tuple[np.ndarray, np.ndarray]] = []
    safe = np.maximum(lengths, 1)
    while True:
        active = np.flatnonzero(starts < last)
        if not active.size:
            break
        s, end = starts[active], last[active]
        lo = s + 1
        hi = np.minimum(end, s + np.maximum(1, budget // safe[s]))
        while True:
            open_ = lo < hi
            if not open_.any():
                break
            mid = (lo + hi + 1) // 2
            fits = (mid - s) * lengths[np.minimum(mid, len(lengths)) - 1] <= budget
            lo = np.where(open_ & fits, mid, lo)
            hi = np.where(open_ & ~fits, mid - 1, hi)
        found.append((active, lo))
        starts[active] = lo
    segments = np.concatenate([a for a, _ in found]) if found else np.zeros(0, np.int64)
    positions = np.concatenate([e for _, e in found]) if found else np.zeros(0, np.int64)
    order = np.lexsort((positions, segments))  # by segment, then along it
    segments, positions = segments[order], positions[order]
    bounds = np.searchsorted(segments, np.arange(len(first) + 1))
    return [positions[bounds[b]: bounds[b + 1]] for b in range(len(first))]


def _crops(lengths: np.ndarray, policy: BatchPolicy, hop: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """Crop every member to the shortest (at most max_sample_size), at random offsets on the frame grid."""
    target = int(min(lengths.min(), policy.max_sample_size))
    slack_hops = (lengths - target) // hop
    offsets = (rng.integers(0, slack_hops + 1) * hop).astype(np.int64)
    return target, offsets


def rank_batch_count(total: int, start: int, world_size: int, tail: str) -> int:
    """How many batches each rank serves from global batch `start` to the epoch's end."""
    remaining = max(0, total - start)
    return remaining // world_size if tail == "drop" else -(-remaining // world_size)


def rank_batch_numbers(total: int, start: int, rank: int, world_size: int, tail: str) -> list[tuple[int, bool]]:
    """(global batch number, is padding) served by `rank`, from global batch `start` to the epoch's end."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    served = []
    for j in range(rank_batch_count(total, start, world_size, tail)):
        g = start + j * world_size + rank
        served.append((g, False) if g < total else ((g - total) % max(total, 1), True))
    return served
