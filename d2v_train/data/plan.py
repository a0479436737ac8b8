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


def plan_epoch(index: SplitIndex, policy: BatchPolicy, seed: int, epoch: int, *, hop: int = 320) -> list[GlobalBatch]:
    """Every global batch of the epoch, numbered in serving order."""
    batches: list[GlobalBatch] = []
    for block_number, block in enumerate(epoch_blocks(index, policy, seed, epoch)):
        if policy.max_tokens is not None:
            groups = _token_budget_groups(index, block, policy)
        else:
            groups = [block[i: i + policy.batch_size] for i in range(0, len(block), policy.batch_size)]
        if policy.shuffle and policy.max_tokens is not None:
            groups = [groups[i] for i in _rng(seed, epoch, 3, block_number).permutation(len(groups))]
        for group in groups:
            number = len(batches)
            if index.modality == "speech" and policy.crop:
                length, offsets = _crops(index.lengths[group], policy, hop, _rng(seed, epoch, 4, number))
                batches.append(GlobalBatch(number, group, length, offsets))
            else:
                batches.append(GlobalBatch(number, group))
    return batches


def _token_budget_groups(index: SplitIndex, block: np.ndarray, policy: BatchPolicy) -> list[np.ndarray]:
    lengths = index.lengths[block]
    if policy.crop:  # training: short utterances are left out, long ones are cropped
        keep = lengths >= policy.min_sample_size
        block, lengths = block[keep], np.minimum(lengths[keep], policy.max_sample_size)
    # Sorting by length keeps members alike (little is cropped away); the stable sort keeps the
    # block's shuffled order among equal lengths.
    order = np.argsort(lengths, kind="stable")
    block, lengths = block[order], lengths[order]
    groups: list[np.ndarray] = []
    start = 0
    for end in range(1, len(block) + 1):
        if end - start > 1 and (end - start) * lengths[end - 1] > policy.max_tokens:
            groups.append(block[start: end - 1])
            start = end - 1
    if start < len(block):
        groups.append(block[start:])
    return groups


def _crops(lengths: np.ndarray, policy: BatchPolicy, hop: int, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """Crop every member to the shortest (at most max_sample_size), at random offsets on the frame grid."""
    target = int(min(lengths.min(), policy.max_sample_size))
    slack_hops = (lengths - target) // hop
    offsets = (rng.integers(0, slack_hops + 1) * hop).astype(np.int64)
    return target, offsets


def rank_batch_numbers(total: int, start: int, rank: int, world_size: int, tail: str) -> list[tuple[int, bool]]:
    """(global batch number, is padding) served by `rank`, from global batch `start` to the epoch's end."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    remaining = max(0, total - start)
    rounds = remaining // world_size if tail == "drop" else -(-remaining // world_size)
    served = []
    for j in range(rounds):
        g = start + j * world_size + rank
        served.append((g, False) if g < total else ((g - total) % max(total, 1), True))
    return served
