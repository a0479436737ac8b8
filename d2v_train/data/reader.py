"""Fetching a batch's samples from shard tars at any fsspec URL with few, large ranged reads.

The Parquet index tells where every member of a sample lies in its tar, so a batch never scans a
tar: the samples of each shard are coalesced into ranged reads of up to 16 MB (an object store
charges per request, and a small gap is cheaper to read than to skip), fetched in threads with
retries on transient errors, and each member's tar header is checked against the index.
Optionally whole shards are kept in a local cache keyed by their sha256 (shards are immutable).
Torch-free: the loader's process workers and tools use it alike.
"""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import logging
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from pipelines.storage import Location, is_local, join
from schemas.arrow import SPAN_COLUMNS, payload_crc32
from schemas.dataset import inside_root, sha256_hex

log = logging.getLogger(__name__)

_BLOCK = 512  # a tar header; the data member's header sits right before its data
_DOWNLOAD_CHUNK = 16 << 20  # ranged reads that fill the local cache


@dataclass(frozen=True)
class SampleRequest:
    shard: int  # position in the reader's shard list
    key: str
    sample_offset: int
    sample_bytes: int
    data_offset: int
    data_bytes: int
    json_offset: int
    json_bytes: int
    mask_offset: int
    mask_bytes: int
    payload_crc32: int = -1  # -1: the index records none (built by an older d2v)

    @classmethod
    def from_row(cls, shard: int, row: Mapping) -> SampleRequest:
        """From a shard index row (schemas.arrow.index_schema)."""
        return cls(shard, row["key"], *(int(row[column]) for column in SPAN_COLUMNS),
                   int(row.get("payload_crc32", -1)))


@dataclass
class SampleBytes:
    key: str
    data: bytes
    json: bytes
    mask: bytes
    damage: str | None = None  # why these bytes are not the ones the build wrote (a payload checksum)


class ShardError(OSError):
    """A shard that cannot be read as its index says; names the shard (relative path) and the problem."""

    def __init__(self, shard: str, problem: str | None = None) -> None:
        # One argument is a whole message: torchdata re-raises worker errors as type(exc)(message).
        super().__init__(shard if problem is None else f"shard {shard}: {problem}")
        self.shard = shard
        self.problem = problem

    def __str__(self) -> str:  # OSError would prefix an errno when given two arguments; it never is
        return str(self.args[0])

    def __reduce__(self):  # so it crosses process boundaries (loader workers) intact
        return type(self), (self.shard, self.problem)


@dataclass
class ReaderStats:
    requests: int = 0  # ranged reads answered by the store (a retried read counts once)
    bytes: int = 0  # bytes received from the store
    retries: int = 0
    skipped_shards: int = 0
    skipped_samples: int = 0
    cache_hits: int = 0  # ranged reads served from the local cache
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def __getstate__(self) -> dict[str, int]:
        return self.as_dict()

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(**state)


@dataclass
class ReadRange:
    """One ranged read: bytes [start, end) of a shard, serving the batch positions in `items`."""

    shard: int
    start: int
    end: int
    items: list[int]


def plan_ranges(requests: list[SampleRequest], max_request_bytes: int, max_gap_bytes: int) -> list[ReadRange]:
    """Coalesce each shard's samples, in offset order, into reads of at most `max_request_bytes`
    (a bigger sample alone) that skip no gap longer than `max_gap_bytes`."""
    by_shard: dict[int, list[int]] = defaultdict(list)
    for position, request in enumerate(requests):
        by_shard[request.shard].append(position)
    ranges: list[ReadRange] = []
    for shard in sorted(by_shard):
        current: ReadRange | None = None
        for position in sorted(by_shard[shard], key=lambda p: (requests[p].sample_offset, p)):
            start = requests[position].sample_offset
            end = start + requests[position].sample_bytes
            if (current is not None and start - current.end <= max_gap_bytes
                    and max(end, current.end) - current.start <= max_request_bytes):
                current.end = max(current.end, end)
                current.items.append(position)
            else:
                current = ReadRange(shard, start, end, [position])
                ranges.append(current)
    return ranges


class _Shard(NamedTuple):
    name: str  # tar path relative to its dataset's root
    sha256: str
    size: int
    source: int = 0  # which of the reader's locations (datasets) holds it


class ShardReader:
    """Reads batches of samples from the shards named in dataset.json; safe to call from several threads.

    `timeout_s` bounds how long `read` waits for a batch's reads (queueing included) and how long a
    thread waits for another one's cache download; beyond it the shard is reported as bad.
    """

    def __init__(self, location: Location | Sequence[Location], shards: list[tuple], *, data_suffix: str,
                 max_request_bytes: int = 16 << 20, max_gap_bytes: int = 1 << 20, threads: int = 8,
                 retries: int = 5, backoff_s: float = 0.1, cache_dir: str | None = None,
                 skip_bad_shards: bool = False, open_fs: Callable[[], tuple] | None = None,
                 timeout_s: float = 600.0) -> None:
        if max_request_bytes < 1 or max_gap_bytes < 0 or threads < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("max_request_bytes and threads must be >= 1, max_gap_bytes and retries >= 0, "
                             "timeout_s > 0")
        # several locations: the datasets of a mix; each shard is (name, sha256, bytes[, location number])
        self.locations = [location] if isinstance(location, Location) else list(location)
        self.location = self.locations[0]
        if open_fs is not None and len(self.locations) > 1:
            raise ValueError("open_fs opens one location; this reader has several")
        # the names are opened under the root and the digests name cache files: neither may leave its folder
        self.shards = [_Shard(inside_root(name), sha256_hex(sha), int(size), int(source[0]) if source else 0)
                       for name, sha, size, *source in shards]
        if any(not 0 <= s.source < len(self.locations) for s in self.shards):
            raise ValueError(f"a shard names a location outside the reader's {len(self.locations)}")
        self.data_suffix = data_suffix
        self.max_request_bytes, self.max_gap_bytes = max_request_bytes, max_gap_bytes
        self.threads, self.retries, self.backoff_s, self.timeout_s = threads, retries, backoff_s, timeout_s
        self.cache_dir = cache_dir
        self.skip_bad_shards = skip_bad_shards
        self._open_fs = open_fs
        self.stats = ReaderStats()
        self._bad: set[int] = set()
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        # Threads, clients and locks do not survive fork or pickling: rebuilt lazily in each process.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._fs: dict[int, tuple] = {}
        self._shard_locks: dict[int, threading.Lock] = defaultdict(threading.Lock)
        self._cached: set[int] = set()  # shards whose cached copy this process has checked
        self._jitter = random.Random(0)  # backoff only; never touches the data
        self.stats._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_pid", "_lock", "_pool", "_fs", "_shard_locks", "_cached", "_jitter")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- reading ------------------------------------------------------------------------------
    def read(self, requests: list[SampleRequest]) -> list[SampleBytes | None]:
        """The samples in request order; None only for samples of shards skipped as bad. A sample
        whose payload checksum differs from the index comes back with `damage` set."""
        for request in requests:
            if not 0 <= request.shard < len(self.shards):
                raise ValueError(f"sample {request.key} names shard {request.shard}; the reader has "
                                 f"{len(self.shards)} shards")
        if self._pid != os.getpid():
            self._reset_runtime()
        results: list[SampleBytes | None] = [None] * len(requests)
        with self._lock:
            known_bad = set(self._bad)
        wanted = [p for p, r in enumerate(requests) if r.shard not in known_bad]
        ranges = plan_ranges([requests[p] for p in wanted], self.max_request_bytes, self.max_gap_bytes)
        # A local disk gains nothing from the pool: read in the calling thread (fewer thread
        # switches holding the GIL on small machines). Remote stores keep the pool and its deadline.
        inline = self.cache_dir is None and all(is_local(self._filesystem(n)[0]) for n in range(len(self.locations)))
        pool = None if inline else self._executor()
        futures = []
        for read in ranges:
            read.items = [wanted[i] for i in read.items]
            futures.append((read, _run_now(self._fetch, read, requests) if inline
                            else pool.submit(self._fetch, read, requests)))
        deadline = time.monotonic() + self.timeout_s
        failed: dict[int, ShardError] = {}
        for read, future in futures:
            if read.shard in failed:
                future.cancel()
                continue
            try:
                samples = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                future.cancel()
                failed[read.shard] = ShardError(self.shards[read.shard].name,
                                                f"no answer within {self.timeout_s:g} s")
                continue
            except ShardError as exc:
                failed[read.shard] = exc
                continue
            for position, sample in zip(read.items, samples):
                results[position] = sample
        if failed and not self.skip_bad_shards:
            first = min(failed, key=lambda shard: next(p for p, r in enumerate(requests) if r.shard == shard))
            for _, future in futures:
                future.cancel()
            raise failed[first]
        self._mark_bad(failed)
        skipped = sum(1 for r in requests if r.shard in known_bad or r.shard in failed)
        for position, request in enumerate(requests):
            if request.shard in failed:
                results[position] = None
        if skipped:
            self.stats.add(skipped_samples=skipped)
        return results

    def _mark_bad(self, failed: dict[int, ShardError]) -> None:
        for shard, error in failed.items():
            with self._lock:
                new = shard not in self._bad
                self._bad.add(shard)
            if new:
                self.stats.add(skipped_shards=1)
                log.warning("skipping bad %s", error)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="d2v-reader")
            return self._pool

    def _filesystem(self, source: int = 0):
        with self._lock:
            if source not in self._fs:
                # fail_fast: a client that does not retry by itself, so `retries` means what it says
                self._fs[source] = self._open_fs() if self._open_fs else \
                    self.locations[source].filesystem(fail_fast=True)
            return self._fs[source]

    def _fetch(self, read: ReadRange, requests: list[SampleRequest]) -> list[SampleBytes]:
        shard = self.shards[read.shard]
        if read.end > shard.size:
            raise ShardError(shard.name, f"index names bytes up to {read.end}, beyond the {shard.size} bytes "
                                         "dataset.json records")
        if self.cache_dir:
            try:
                buffer = _pread(self._cached_copy(read.shard), read.start, read.end)
            except FileNotFoundError:  # someone cleared the cache: fetch the shard again
                self._cached.discard(read.shard)
                buffer = _pread(self._cached_copy(read.shard), read.start, read.end)
            self.stats.add(cache_hits=1)
        else:
            buffer = self._cat(read.shard, read.start, read.end)
        if len(buffer) != read.end - read.start:
            raise ShardError(shard.name, f"truncated: bytes [{read.start}, {read.end}) asked, "
                                         f"{len(buffer)} came back")
        view = memoryview(buffer)
        return [self._sample(shard.name, view, read.start, requests[p]) for p in read.items]

    def _sample(self, shard: str, view: memoryview, base: int, request: SampleRequest) -> SampleBytes:
        def member(suffix: str, offset: int, size: int) -> bytes:
            name = f"{request.key}.{suffix}"
            header = offset - _BLOCK
            if header < request.sample_offset or offset + size > request.sample_offset + request.sample_bytes:
                raise ShardError(shard, f"index places {name} outside its sample's bytes")
            head = view[header - base: offset - base]
            found = bytes(head[:100]).split(b"\0", 1)[0]
            if found != name.encode():
                raise ShardError(shard, f"index and tar disagree: the header at {header} names "
                                        f"{found.decode(errors='replace')!r}, not {name!r}")
            if _header_size(head) != size:
                raise ShardError(shard, f"index and tar disagree on the size of {name}")
            return bytes(view[offset - base: offset - base + size])

        sample = SampleBytes(request.key, member(self.data_suffix, request.data_offset, request.data_bytes),
                             member("json", request.json_offset, request.json_bytes),
                             member("mask.npy", request.mask_offset, request.mask_bytes))
        if request.payload_crc32 >= 0:
            found = payload_crc32(sample.data, sample.json, sample.mask)
            if found != request.payload_crc32:
                # One damaged sample, not a damaged shard: the caller names it, or skips only it.
                sample.damage = (f"payload checksum differs from the index (crc32 {found:08x}, "
                                 f"index {request.payload_crc32:08x})")
        return sample

    def _cat(self, index: int, start: int, end: int) -> bytes:
        """One ranged read from the store, retried on transient errors."""
        shard = self.shards[index]
        fs, root = self._filesystem(shard.source)
        path = join(root, shard.name)
        for attempt in range(self.retries + 1):
            try:
                data = fs.cat_file(path, start=start, end=end)  # keywords: s3fs's 2nd positional is version_id
            except FileNotFoundError as exc:
                raise ShardError(shard.name, "tar is missing") from exc
            except Exception as exc:  # noqa: BLE001 - every failure becomes a ShardError naming the shard
                if not _transient(exc):
                    raise ShardError(shard.name, _explain(fs, path, shard.size, start, end, exc)) from exc
                if attempt == self.retries:
                    raise ShardError(shard.name, f"still failing after {self.retries} retries: "
                                                 f"{_describe(exc)}") from exc
                self.stats.add(retries=1)
                time.sleep(self.backoff_s * 2 ** attempt * (1 + 0.25 * self._jitter.random()))
                continue
            self.stats.add(requests=1, bytes=len(data))
            return data
        raise AssertionError("unreachable")

    # -- local cache ----------------------------------------------------------------------------
    def _cached_copy(self, index: int) -> str:
        """The local copy of a shard, downloaded once (one thread per shard; the others wait)."""
        shard = self.shards[index]
        path = os.path.join(self.cache_dir, f"{shard.sha256}.tar")
        if index in self._cached:
            return path
        with self._lock:
            lock = self._shard_locks[index]
        if not lock.acquire(timeout=self.timeout_s):
            raise ShardError(shard.name, f"its download into the cache took longer than {self.timeout_s:g} s")
        try:
            if index not in self._cached:
                if os.path.exists(path) and not _intact(path, shard):
                    # Never serve a damaged copy; the store still has the shard.
                    log.warning("cached copy of shard %s is damaged; downloading it again", shard.name)
                    os.unlink(path)
                if not os.path.exists(path):
                    self._download(index, path)
                self._cached.add(index)
        finally:
            lock.release()
        return path

    def _download(self, index: int, path: str) -> None:
        shard = self.shards[index]
        tmp = os.path.join(self.cache_dir, f".{shard.sha256}.{uuid.uuid4().hex}.tmp")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for start in range(0, shard.size, _DOWNLOAD_CHUNK):
                    end = min(start + _DOWNLOAD_CHUNK, shard.size)
                    chunk = self._cat(index, start, end)
                    if len(chunk) != end - start:
                        raise ShardError(shard.name, f"truncated: dataset.json records {shard.size} bytes, "
                                                     f"the store has {start + len(chunk)}")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != shard.sha256:
                raise ShardError(shard.name, "checksum differs from dataset.json")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _pread(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _header_size(header: memoryview) -> int:
    field = bytes(header[124:136])
    if field[0] & 0x80:  # base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        return -1  # not a tar header: disagrees with any size


def _intact(path: str, shard: _Shard) -> bool:
    if os.path.getsize(path) != shard.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == shard.sha256


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_S3_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                       "RequestLimitExceeded", "500", "502", "503", "504"}


def _transient(exc: BaseException) -> bool:
    """Worth asking again: connection resets, timeouts, 5xx and throttling; not a missing or denied object."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError):
        # s3fs maps client mistakes (an unsatisfiable range, a malformed request) to EINVAL.
        return exc.errno != errno.EINVAL
    try:
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from s3fs.core import S3_RETRYABLE_ERRORS
    except ImportError:
        return False
    if isinstance(exc, S3_RETRYABLE_ERRORS + (BotoConnectionError,)):
        return True
    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES


def _explain(fs, path: str, recorded: int, start: int, end: int, exc: Exception) -> str:
    # An object store refuses a range past the end (HTTP 416) with no useful message: say why.
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:
        try:
            held = int(fs.size(path))
        except Exception:  # noqa: BLE001 - only an explanation
            held = None
        if held is not None and held < end:
            return f"truncated: the store holds {held} bytes, dataset.json records {recorded}"
    return f"cannot read bytes [{start}, {end}): {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _run_now(fn, *args) -> concurrent.futures.Future:
    """A finished future holding fn's result or its ShardError."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(fn(*args))
    except ShardError as exc:
        future.set_exception(exc)
    return future
