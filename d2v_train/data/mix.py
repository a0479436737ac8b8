"""Several splits and datasets streamed as one epoch plan (LibriSpeech 960 h is three subsets).

A mix is a list of parts, each a split of a dataset, with either a weight (its share of an
epoch's samples, relative to the others' weights; an epoch holds as many samples as all parts
together) or a repeat count (how often each of its samples appears per epoch; 0.5 = a seeded
half, 2 = every sample twice). Which samples appear how often in an epoch is a pure function of
(seed, epoch), like the rest of the plan, so coverage, exact and elastic resume and the token
budget hold across the mix. The joined index numbers the parts' shards and rows one after the
other; the plan and the reader see one split.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from d2v_train.data.index import PlannedIndex, SplitIndex, StringColumn
from pipelines.storage import Location


@dataclass(frozen=True)
class MixPart:
    url: str
    split: str
    weight: float | None = None  # share of an epoch's samples, relative to the other parts' weights
    repeat: float | None = None  # times each sample appears per epoch (default 1)
    name: str | None = None  # how metrics name it (default: the split, or URL#split where URLs differ)

    def __post_init__(self) -> None:
        if self.weight is not None and self.repeat is not None:
            raise ValueError(f"{self.url}#{self.split}: give a weight or a repeat count, not both")
        for field, value in (("weight", self.weight), ("repeat", self.repeat)):
            if value is not None and not value > 0:
                raise ValueError(f"{self.url}#{self.split}: {field} must be positive, not {value}")


def check_parts(parts: list[MixPart]) -> None:
    """Weights are all-or-nothing: an epoch's size is shared out by weight, or each part repeats."""
    if not parts:
        raise ValueError("a mix needs at least one part")
    weighted = [p.weight is not None for p in parts]
    if any(weighted) and not all(weighted):
        raise ValueError("give every part a weight, or none (then each part's repeat count applies, default 1)")


def part_names(parts: list[MixPart]) -> list[str]:
    """Each part's name in metrics: its own, the split (one dataset), or URL#split."""
    one_url = len({p.url for p in parts}) == 1
    names = [p.name or (p.split if one_url else f"{Location(p.url).public_url()}#{p.split}") for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"two parts of the mix are both named {sorted({n for n in names if names.count(n) > 1})}: "
                         "give them names")
    return names


def epoch_counts(sizes: list[int], parts: list[MixPart]) -> list[int]:
    """How many samples each part contributes to every epoch."""
    if parts[0].weight is not None:
        total, weights = sum(sizes), np.array([p.weight for p in parts], dtype=np.float64)
        shares = weights / weights.sum() * total
        counts = np.floor(shares).astype(np.int64)
        # largest remainders: the counts add up to the epoch's size exactly
        counts[np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]] += 1
        return [int(c) if size else 0 for c, size in zip(counts, sizes)]
    return [int(round((1.0 if p.repeat is None else p.repeat) * size)) for p, size in zip(parts, sizes)]


def multiplicity(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of `size` samples appears so that `count` appear in all: every one
    count // size times, and a random count % size of them once more."""
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    times, extra = divmod(count, size)
    out = np.full(size, times, dtype=np.int64)
    out[rng.permutation(size)[:extra]] += 1
    return out


class MixedColumns(Mapping):
    """The parts' columns joined in part order; "shard" renumbered across the parts, "source" the
    part of each row. Read on first use, like a split's."""

    def __init__(self, index: MixedIndex) -> None:
        self.index = index
        self._loaded: dict = {}
        self._lock = threading.Lock()

    def _names(self) -> list[str]:
        return ["source", *self.index.parts_index[0].columns]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __getitem__(self, name: str):
        if name not in self._loaded:
            if name not in self:
                raise KeyError(name)
            joined = self._join(name)
            with self._lock:
                self._loaded.setdefault(name, joined)
        return self._loaded[name]

    def _join(self, name: str):
        parts = self.index.parts_index
        if name == "source":
            return np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
        if name == "shard":
            return np.concatenate([p.columns["shard"].astype(np.int64) + offset
                                   for p, offset in zip(parts, self.index.shard_offsets)])
        pieces = [p.columns[name] for p in parts]
        if isinstance(pieces[0], StringColumn):
            return StringColumn(pa.concat_arrays([piece.array.cast(pa.large_string()) for piece in pieces]))
        return np.concatenate(pieces)

    def gather(self, rows: np.ndarray, names: tuple[str, ...]) -> list[list]:
        out: list[list] = [[None] * len(rows) for _ in names]
        part_of = np.searchsorted(self.index.row_offsets, rows, side="right") - 1
        for number in np.unique(part_of).tolist():
            mine = np.flatnonzero(part_of == number)
            local = rows[mine] - self.index.row_offsets[number]
            found = self._part_gather(number, local, names)
            for values, target in zip(found, out):
                for j, value in zip(mine.tolist(), values):
                    target[j] = value
        return out

    def _part_gather(self, number: int, local: np.ndarray, names: tuple[str, ...]) -> list[list]:
        part = self.index.parts_index[number]
        plain = [n for n in names if n not in ("shard", "source")]
        found = dict(zip(plain, part.gather(local, tuple(plain)))) if plain else {}
        if "shard" in names:
            found["shard"] = (part.columns["shard"][local].astype(np.int64) + self.index.shard_offsets[number]).tolist()
        if "source" in names:
            found["source"] = [number] * len(local)
        return [found[n] for n in names]


class MixedIndex(PlannedIndex):
    """The split indexes of a mix's parts as one index (what the plan, the loader and the reader
    use of a SplitIndex), with the epoch multiplicities the parts' weights or repeats ask for."""

    def __init__(self, parts: list[MixPart], indexes: list[SplitIndex]) -> None:
        check_parts(parts)
        _check_compatible(parts, indexes)
        self.parts, self.parts_index = parts, indexes
        self.names = part_names(parts)
        self.dataset = indexes[0].dataset
        self.location = indexes[0].location
        self.split = "+".join(self.names)
        self.sizes = [len(ix) for ix in indexes]
        self.counts = epoch_counts(self.sizes, parts)
        self.shard_offsets = np.concatenate([[0], np.cumsum([len(ix.shards) for ix in indexes])]).astype(np.int64)
        self.row_offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        urls = list(dict.fromkeys(p.url for p in parts))
        self.locations = [next(ix.location for p, ix in zip(parts, indexes) if p.url == url) for url in urls]
        self.shards = [s for ix in indexes for s in ix.shards]
        self.shard_sources = [urls.index(p.url) for p, ix in zip(parts, indexes) for _ in ix.shards]
        self.columns = MixedColumns(self)

    @classmethod
    def load(cls, parts: list[MixPart], *, threads: int = 16) -> MixedIndex:
        locations: dict[str, Location] = {}
        indexes = [SplitIndex.load(locations.setdefault(p.url, Location(p.url)), p.split, threads=threads)
                   for p in parts]
        return cls(parts, indexes)

    def __len__(self) -> int:
        return int(self.row_offsets[-1])

    def select(self, rows: np.ndarray):
        raise ValueError("a labelled subset is drawn from one split, not from a mix")

    @property
    def mask_variants(self) -> int:
        """Stored mask variants every part has (an epoch uses variant epoch % this)."""
        return min(ix.dataset.mask.variants for ix in self.parts_index)

    def multiplicity(self, seed: int, epoch: int) -> np.ndarray | None:
        """How often each row appears in `epoch` (None: once each, a mix without weights or repeats)."""
        if all(p.weight is None and p.repeat is None for p in self.parts):
            return None
        return np.concatenate([multiplicity(size, count, np.random.default_rng([seed, epoch, 6, number]))
                               for number, (size, count) in enumerate(zip(self.sizes, self.counts))])

    def epoch_samples(self) -> dict[str, int]:
        """Samples each part contributes per epoch (before training's length filter)."""
        return dict(zip(self.names, self.counts))


# what the parts of a mix must agree on, by dataset.json field: the loader decodes and masks
# every sample of the mix alike
_MUST_AGREE = {"modality": lambda d: d.modality, "frame_grid": lambda d: d.frame_grid,
               "image_size": lambda d: d.image_size, "patch_size": lambda d: d.patch_size,
               "tokenizer": lambda d: d.tokenizer and d.tokenizer.sha256, "mask.kind": lambda d: d.mask.kind}


def _check_compatible(parts: list[MixPart], indexes: list[SplitIndex]) -> None:
    first = indexes[0].dataset
    for number, (part, index) in enumerate(zip(parts, indexes)):
        for field, value in _MUST_AGREE.items():
            if value(index.dataset) != value(first):
                raise ValueError(f"data.sources[{number}] ({Location(part.url).public_url()}) has {field} "
                                 f"{value(index.dataset)!r}, data.sources[0] has {value(first)!r}: the parts of a "
                                 "mix must agree on it")
        if not len(index):
            raise ValueError(f"split {part.split!r} of {Location(part.url).public_url()} has no samples")


def open_index(parts: list[MixPart], *, threads: int = 16) -> SplitIndex | MixedIndex:
    """One part without a weight or repeat is a split as before; anything else a mix."""
    if len(parts) == 1 and parts[0].weight is None and parts[0].repeat is None:
        return SplitIndex.load(Location(parts[0].url), parts[0].split, threads=threads)
    return MixedIndex.load(parts, threads=threads)
