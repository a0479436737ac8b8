"""The streaming loader: a torchdata.nodes pipeline over an epoch plan, exactly and elastically resumable.

Batches are planned from metadata (plan.py), fetched with coalesced ranged reads (reader.py),
decoded and collated in threads (decode.py, collate.py), in order. The state is three integers:
the epoch, the global batches consumed in it, and the seed. Because the plan does not depend on
the world size, a state saved at one world size resumes at any other: rank r then serves global
batches done + r, done + r + W, ...
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torchdata.nodes as tn

from d2v_train.data.batches import Batch
from d2v_train.data.index import SplitIndex
from d2v_train.data.mix import MixedIndex, MixPart, open_index
from d2v_train.data.modalities import MODALITIES
from d2v_train.data.plan import BatchPolicy, EpochPlan, plan_epoch, rank_batch_count, rank_batch_numbers
from d2v_train.data.reader import SampleRequest, ShardError, ShardReader
from d2v_train.data.transforms import ImageTransform
from pipelines.storage import Location
from schemas import FrameGrid
from schemas.arrow import DATA_SUFFIX, SPAN_COLUMNS

log = logging.getLogger(__name__)

STATE_VERSION = 1
_REQUEST_COLUMNS = (*SPAN_COLUMNS, "payload_crc32")  # SampleRequest's fields after shard and key


@dataclass
class Throughput:
    """What the loader has delivered, for progress lines and metrics (thread-safe)."""

    batches: int = 0
    samples: int = 0
    audio_seconds: float = 0.0
    tokens: int = 0
    by_source: dict[int, int] = field(default_factory=dict)  # a mix: samples delivered per part
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, samples: int, audio_seconds: float = 0.0, tokens: int = 0) -> None:
        with self._lock:
            self.batches += 1
            self.samples += samples
            self.audio_seconds += audio_seconds
            self.tokens += tokens

    def add_sources(self, sources: list[int]) -> None:
        """A mix's batch: the part of each of its samples."""
        with self._lock:
            for source in sources:
                self.by_source[source] = self.by_source.get(source, 0) + 1

    def rates(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {"samples_per_s": self.samples / elapsed, "audio_s_per_s": self.audio_seconds / elapsed,
                "tokens_per_s": self.tokens / elapsed, "elapsed_s": elapsed}


class StreamingLoader:
    """Iterate to get one epoch of this rank's batches; iterate again for the next epoch."""

    def __init__(self, location: Location | str | None, split: str, policy: BatchPolicy, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True, workers: int = 4, prefetch: int = 2,
                 io_threads: int = 8, retries: int = 5, cache_dir: str | None = None, skip_bad_shards: bool = False,
                 image_size: int = 224, image_transform: ImageTransform | None = None,
                 keep_empty_batches: bool = False, mix: list[MixPart] | None = None) -> None:
        """``keep_empty_batches``: a batch whose samples all came from skipped bad shards is still
        handed out, as {"keys": [], "skipped": n, ...}, so that every rank sees the same number of
        batches (a trainer's ranks must step together); by default it is left out. ``mix``: several
        splits or datasets streamed as one (mix.py), instead of `location` and `split`."""
        if mix is not None:
            self.index = open_index(mix)
            split = self.index.split
        else:
            self.index = SplitIndex.load(location if isinstance(location, Location) else Location(location), split)
        self.location = self.index.location
        if not 0 <= rank < world_size:
            raise ValueError(f"--rank {rank} must be in [0, --world-size {world_size})")
        self.split, self.policy, self.rank, self.world_size = split, policy, rank, world_size
        self.seed, self.train, self.workers, self.prefetch = seed, train, max(1, workers), max(1, prefetch)
        self.image_size, self.keep_empty_batches = image_size, keep_empty_batches
        self.image_transform = image_transform or ImageTransform()  # ImageNet's by default
        dataset = self.index.dataset
        self.modality = MODALITIES[dataset.modality]
        self.modality.check_policy(policy)
        self.frame_grid = dataset.frame_grid or FrameGrid()
        self.variants = self.index.mask_variants
        self.reader = ShardReader(
            self.index.locations,
            [(s.name, s.sha256, s.bytes, source) for s, source in zip(self.index.shards, self.index.shard_sources)],
            data_suffix=DATA_SUFFIX[dataset.modality], threads=io_threads, retries=retries, cache_dir=cache_dir,
            skip_bad_shards=skip_bad_shards,
        )
        self.throughput = Throughput()
        self.epoch = 0
        self._start = 0  # global batches of self.epoch consumed before this iteration began
        self._served = 0  # batches this rank has handed out in this iteration
        self._plans: dict[int, EpochPlan] = {}

    def restrict(self, rows: np.ndarray) -> None:
        """Serve only these positions of the split from now on (a labelled subset, eval/labelled.py);
        called before the first iteration, since the plan of the whole split no longer applies."""
        if self._served or self._start or self.epoch:
            raise RuntimeError("restrict() a loader before iterating it")
        self.index = self.index.select(rows)
        self._plans = {}

    # -- planning -----------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.index, self.policy, self.seed, epoch, hop=self.frame_grid.hop)}
        return self._plans[epoch]

    def __len__(self) -> int:
        """Batches this rank serves in the current epoch from the current position."""
        total = len(self.plan(self.epoch))
        return rank_batch_count(total, self._start, self.world_size, self.policy.tail) - self._served

    # -- state --------------------------------------------------------------------------------
    @property
    def global_batches_done(self) -> int:
        return self._start + self._served * self.world_size

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "split": self.split, "seed": self.seed, "epoch": self.epoch,
                "global_batches_done": self.global_batches_done, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["split"] != self.split or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for split {state['split']!r} with seed {state['seed']}, "
                f"this loader reads split {self.split!r} with seed {self.seed}"
            )
        self.seek(state["epoch"], state["global_batches_done"])

    def seek(self, epoch: int, global_batches_done: int) -> None:
        """Continue from this position (a checkpoint's): the next iteration serves the global batches
        of `epoch` after the first `global_batches_done`, this rank's share of them."""
        self.epoch, self._start, self._served = int(epoch), int(global_batches_done), 0

    def next_epoch(self) -> None:
        """Leave what is left of this epoch: the next iteration starts the following one."""
        self.seek(self.epoch + 1, 0)

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan(self.epoch)
        served = rank_batch_numbers(len(plan), self._start, self.rank, self.world_size, self.policy.tail)
        todo = [(plan, number, padding, self.epoch) for number, padding in served[self._served:]]
        mapper = tn.ParallelMapper(tn.IterableWrapper(todo), self._load, num_workers=self.workers, in_order=True,
                                   method="thread")
        prefetcher = tn.Prefetcher(mapper, prefetch_factor=self.prefetch)
        node = tn.PinMemory(prefetcher) if torch.cuda.is_available() else prefetcher
        finished = False
        try:
            for batch in _unwrapped_errors(tn.Loader(node, restart_on_stop_iteration=False)):
                self._served += 1  # handed out = consumed: a state saved now resumes after this batch
                if batch is None:
                    continue  # every sample came from skipped bad shards
                self._count(batch)  # here, not in _load: prefetched batches are not delivered yet
                yield batch
            finished = True
        finally:
            if not finished:  # a normal end needs no teardown (its threads have ended or are ending)
                _stop_threads(prefetcher, mapper)
        self.epoch += 1
        self._start = 0
        self._served = 0

    def _decoded(self, requests, fetched, keep: list[int], decode_one) -> list:
        """`decode_one(j)` for each j of `keep`; a sample whose payload checksum differs or that
        cannot be decoded (damaged bytes) is a ShardError naming its shard and key, or with
        skip_bad_shards is dropped from `keep`, counted and logged."""
        items, good = [], []
        for j in keep:
            sample = fetched[j]
            if sample.damage:
                problem = f"sample {sample.key}: {sample.damage}"
            else:
                try:
                    items.append(decode_one(j))
                    good.append(j)
                    continue
                except Exception as exc:  # noqa: BLE001 - whatever damaged bytes make a decoder raise
                    problem = f"sample {sample.key} cannot be decoded ({type(exc).__name__}: {exc})"
            shard = self.reader.shards[requests[j].shard].name
            if not self.reader.skip_bad_shards:
                raise ShardError(shard, problem + "; data.skip_bad_shards / --skip-bad-shards skips such samples")
            log.warning("skipping a sample of shard %s: %s", shard, problem)
            self.reader.stats.add(skipped_samples=1)
        keep[:] = good
        return items

    def _empty(self, skipped: int, epoch: int, plan, padding: bool) -> Batch | None:
        if not self.keep_empty_batches:
            return None
        return {"keys": [], "skipped": skipped, "epoch": epoch, "batch": plan.number, "padding": padding}

    def _count(self, batch: dict) -> None:
        # numpy, not a torch reduction: this runs in the consumer's thread (the trainer's), where a
        # torch sum of a speech batch's mask took ~6 ms and woke torch's intra-op threads
        padding = batch["padding_mask"].numpy() if "padding_mask" in batch else None
        real = padding.size - int(np.count_nonzero(padding)) if padding is not None else 0  # samples or tokens
        self.throughput.add(len(batch["keys"]), **self.modality.delivered(real, self))
        if "sources" in batch:
            self.throughput.add_sources(batch["sources"])

    def _load(self, item: tuple[EpochPlan, int, bool, int]) -> Batch:
        epoch_plan, number, padding, epoch = item
        plan = epoch_plan[number]  # made here, in a worker thread (a speech crop is drawn per batch)
        fields = self.index.gather(plan.samples, ("shard", "key", *_REQUEST_COLUMNS))
        requests = [SampleRequest(*values) for values in zip(*fields)]
        fetched = self.reader.read(requests)
        keep = [j for j, sample in enumerate(fetched) if sample is not None]
        variant = epoch % self.variants
        rng = np.random.default_rng([self.seed, epoch, plan.number, 5])
        if not keep:
            return self._empty(len(requests), epoch, plan, padding)
        modality = self.modality
        draws = modality.draws(keep, rng)
        items = self._decoded(requests, fetched, keep,
                              lambda j: modality.decode(self, fetched[j], plan, j, variant, draws))
        skipped = len(requests) - len(keep)
        if not keep:
            return self._empty(skipped, epoch, plan, padding)
        batch = modality.collate(self, items, [fetched[j].key for j in keep], [plan.samples[j] for j in keep],
                                 plan, rng)
        batch.update({"epoch": epoch, "batch": plan.number, "padding": padding})
        if isinstance(self.index, MixedIndex):  # which part of the mix each sample came from
            batch["sources"] = self.index.columns["source"][[plan.samples[j] for j in keep]].tolist()
        if skipped:
            batch["skipped"] = skipped  # samples of skipped bad shards left out of this batch
        return batch

    def close(self) -> None:
        self.reader.close()


def _unwrapped_errors(batches):
    """torchdata re-raises a worker's ShardError with the worker's traceback folded into its
    message (once per node it passes): hand on the message the reader wrote."""
    try:
        yield from batches
    except ShardError as exc:
        marker = f"{ShardError.__module__}.{ShardError.__qualname__}: "
        raise ShardError(str(exc).rsplit(marker, 1)[-1].strip()) from None


def _stop_threads(*nodes) -> None:
    """Stop the pipeline's threads from this thread, outermost first.

    When iteration stops early, torchdata 0.11 otherwise leaves the teardown to garbage
    collection, which can run in one of its own threads and fail to join itself.
    """
    for node in nodes:
        inner = getattr(node, "_it", None)
        inner = getattr(inner, "_it", inner)  # ParallelMapper wraps its iterator once more
        shutdown = getattr(inner, "_shutdown", None)
        if shutdown is not None:
            shutdown()
