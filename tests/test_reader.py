"""Ranged reads of samples from shards: exact bytes, coalescing, retries, bad shards, cache, S3."""
from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from d2v_train.data.reader import SampleRequest, ShardError, ShardReader, plan_ranges
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.helpers import tar_members

SUBSETS = ("train-clean-100", "dev-clean")
FAST = {"retries": 3, "backoff_s": 0.001}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    corpus = synthetic.make_librispeech(str(tmp_path_factory.mktemp("ls")), {"train-clean-100": 14, "dev-clean": 5},
                                        seed=4)
    out = tmp_path_factory.mktemp("speech")
    dataset = build_dataset(LibriSpeechSource(Location(corpus.source), SUBSETS), Location(str(out)),
                            BuildOptions(ShardSize.parse("4"), mask_variants=2, seed=1), workers=0,
                            echo=lambda *_: None)
    assert len(dataset.shards) >= 4
    return out, dataset


def shard_list(dataset) -> list[tuple[str, str, int]]:
    return [(s.name, s.sha256, s.bytes) for s in dataset.shards]


def all_requests(out: Path, dataset) -> list[SampleRequest]:
    return [SampleRequest.from_row(number, row) for number, shard in enumerate(dataset.shards)
            for row in pq.read_table(out / shard.index, use_threads=False).to_pylist()]


def expected(out: Path, dataset) -> dict[tuple[int, str], tuple[bytes, bytes, bytes]]:
    found = {}
    for number, shard in enumerate(dataset.shards):
        members = tar_members(out / shard.name)
        keys = {name.split(".", 1)[0] for name in members}
        for key in keys:
            found[number, key] = (members[f"{key}.flac"], members[f"{key}.json"], members[f"{key}.mask.npy"])
    return found


def reader(root, dataset, **options) -> ShardReader:
    return ShardReader(Location(str(root)), shard_list(dataset), data_suffix="flac", **options)


def check_bytes(results, requests, truth) -> None:
    assert len(results) == len(requests)
    for sample, request in zip(results, requests):
        assert sample.key == request.key
        assert (sample.data, sample.json, sample.mask) == truth[request.shard, request.key]


class FlakyFS:
    """Delegates to a real filesystem; cat_file raises ConnectionError the first `failures` times
    (forever with None) for paths containing `only`, or blocks until `release` is set."""

    def __init__(self, fs, failures: int | None = 0, only: str = "", release: threading.Event | None = None):
        self.fs, self.failures, self.only, self.release = fs, failures, only, release
        self.calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def cat_file(self, path, start=None, end=None, **kwargs):
        if self.only in path:
            with self._lock:
                self.calls += 1
                fail = self.failures is None or self.failures > 0
                if fail and self.failures:
                    self.failures -= 1
            if self.release is not None:
                self.release.wait(30)
            elif fail:
                raise ConnectionError("connection reset by peer")
        return self.fs.cat_file(path, start=start, end=end, **kwargs)


def flaky(location: Location, **kwargs):
    fs, root = location.filesystem()
    wrapper = FlakyFS(fs, **kwargs)
    return wrapper, (lambda: (wrapper, root))


# --------------------------------------------------------------------------- planning

def _req(shard: int, offset: int, size: int) -> SampleRequest:
    return SampleRequest(shard, f"k{shard}_{offset}", offset, size, offset + 512, 1, offset + 1536, 1, offset + 2560, 1)


def test_plan_ranges_coalesces_per_shard_within_size_and_gap_limits():
    batch = [_req(0, 4000, 1000), _req(1, 0, 1000), _req(0, 0, 1000), _req(0, 1000, 1000), _req(0, 9000, 5000)]
    planned = plan_ranges(batch, max_request_bytes=10_000, max_gap_bytes=2000)
    spans = [(r.shard, r.start, r.end, r.items) for r in planned]
    assert spans == [(0, 0, 5000, [2, 3, 0]), (0, 9000, 14000, [4]), (1, 0, 1000, [1])]
    # no gaps allowed: only touching samples merge
    assert len(plan_ranges(batch, 10_000, 0)) == 4
    # the size limit splits a run; a sample bigger than the limit is a read of its own
    planned = plan_ranges([_req(0, 0, 1000), _req(0, 1000, 1000), _req(0, 2000, 9000)], 1500, 0)
    spans = [(r.start, r.end) for r in planned]
    assert spans == [(0, 1000), (1000, 2000), (2000, 11000)]


# --------------------------------------------------------------------------- exact bytes, order

def test_reads_return_the_tar_members_in_request_order_with_shards_interleaved(built):
    out, dataset = built
    requests = all_requests(out, dataset)
    random.Random(0).shuffle(requests)
    assert len({r.shard for r in requests[:4]}) > 1
    with reader(out, dataset) as r:
        check_bytes(r.read(requests), requests, expected(out, dataset))
        # small shards: one coalesced read per shard
        assert r.stats.requests == len(dataset.shards) and r.stats.retries == 0
        spans = {}
        for q in requests:
            lo, hi = spans.get(q.shard, (q.sample_offset, 0))
            spans[q.shard] = (min(lo, q.sample_offset), max(hi, q.sample_offset + q.sample_bytes))
        assert r.stats.bytes == sum(hi - lo for lo, hi in spans.values())  # not the tar's end padding
        # a second batch reuses the pool; duplicates are fine
        again = r.read(requests[:3] + requests[:1])
        assert [s.key for s in again] == [q.key for q in requests[:3] + requests[:1]]


def test_request_counts_follow_the_size_and_gap_limits(built):
    out, dataset = built
    requests = all_requests(out, dataset)
    with reader(out, dataset, max_request_bytes=1) as r:
        r.read(requests)
        assert r.stats.requests == len(requests)
    every_other = requests[::2]
    with reader(out, dataset, max_gap_bytes=0) as r:
        r.read(every_other)
        assert r.stats.requests == len(every_other)
    with reader(out, dataset, max_gap_bytes=1 << 20) as r:
        r.read(every_other)
        assert r.stats.requests == len({q.shard for q in every_other})


# --------------------------------------------------------------------------- failures

def test_transient_errors_are_retried_and_change_nothing(built):
    out, dataset = built
    requests = all_requests(out, dataset)
    wrapper, open_fs = flaky(Location(str(out)), failures=4)
    with reader(out, dataset, open_fs=open_fs, retries=5, backoff_s=0.001, threads=1) as r:
        check_bytes(r.read(requests), requests, expected(out, dataset))
        assert r.stats.retries == 4 and r.stats.requests == len(dataset.shards)
    assert wrapper.calls == len(dataset.shards) + 4


def test_a_shard_that_keeps_failing_is_named_within_bounded_time(built):
    out, dataset = built
    victim = dataset.shards[1].name
    _, open_fs = flaky(Location(str(out)), failures=None, only=victim)
    began = time.monotonic()
    with reader(out, dataset, open_fs=open_fs, **FAST) as r, pytest.raises(ShardError) as error:
        r.read(all_requests(out, dataset))
    assert time.monotonic() - began < 10
    assert error.value.shard == victim and victim in str(error.value) and "ConnectionError" in str(error.value)
    assert "3 retries" in str(error.value)


def test_a_read_that_never_answers_times_out_with_the_shard_named(built):
    out, dataset = built
    victim = dataset.shards[0].name
    release = threading.Event()
    _, open_fs = flaky(Location(str(out)), only=victim, release=release)
    r = reader(out, dataset, open_fs=open_fs, timeout_s=0.5)
    try:
        with pytest.raises(ShardError, match="no answer") as error:
            r.read(all_requests(out, dataset))
        assert error.value.shard == victim
    finally:
        release.set()
        r.close()


@pytest.fixture
def damaged(built, tmp_path):
    """A copy of the dataset: shard 1 missing, shard 2 cut in half."""
    out, dataset = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / dataset.shards[1].name).unlink()
    victim = copy / dataset.shards[2].name
    victim.write_bytes(victim.read_bytes()[: dataset.shards[2].bytes // 2])
    return copy, dataset


def test_a_missing_or_truncated_shard_is_an_error_naming_it(damaged):
    copy, dataset = damaged
    requests = all_requests(copy, dataset)
    with reader(copy, dataset) as r:
        with pytest.raises(ShardError, match="missing") as error:
            r.read(requests)
        assert error.value.shard == dataset.shards[1].name
        with pytest.raises(ShardError, match="truncated") as error:
            r.read([q for q in requests if q.shard == 2])
        assert error.value.shard == dataset.shards[2].name
        assert r.stats.retries == 0  # neither is worth asking again


def test_an_index_that_disagrees_with_its_tar_is_an_error(built):
    out, dataset = built
    requests = all_requests(out, dataset)
    first = requests[0]
    moved = SampleRequest(**{**first.__dict__, "json_offset": first.json_offset + 512})
    with reader(out, dataset) as r:
        with pytest.raises(ShardError, match="disagree") as error:
            r.read([moved])
        assert error.value.shard == dataset.shards[0].name and first.key in str(error.value)
        wrong_size = SampleRequest(**{**first.__dict__, "data_bytes": first.data_bytes - 1})
        with pytest.raises(ShardError, match="size"):
            r.read([wrong_size])
        beyond = SampleRequest(**{**first.__dict__, "sample_offset": dataset.shards[0].bytes})
        with pytest.raises(ShardError, match="beyond"):
            r.read([beyond])


def test_every_read_checks_the_payload_checksum_of_each_sample(built):
    """A checksum that differs marks only that sample as damaged; -1 (an index of an older build) is
    not checked; intact samples come back without damage."""
    out, dataset = built
    requests = all_requests(out, dataset)[:4]
    assert all(r.payload_crc32 >= 0 for r in requests)
    wrong = SampleRequest(**{**requests[1].__dict__, "payload_crc32": requests[1].payload_crc32 ^ 1})
    unchecked = SampleRequest(**{**requests[2].__dict__, "payload_crc32": -1})
    with reader(out, dataset) as r:
        results = r.read([requests[0], wrong, unchecked, requests[3]])
    check_bytes(results, [requests[0], wrong, unchecked, requests[3]], expected(out, dataset))
    assert [s.damage is not None for s in results] == [False, True, False, False]
    assert "payload checksum differs" in results[1].damage


def test_bad_shards_can_be_skipped_once_each(damaged, caplog):
    copy, dataset = damaged
    requests = all_requests(copy, dataset)
    bad = {1, 2}
    with reader(copy, dataset, skip_bad_shards=True) as r, caplog.at_level(logging.WARNING):
        for _ in range(2):
            results = r.read(requests)
            assert [s is None for s in results] == [q.shard in bad for q in requests]
        skipped = sum(q.shard in bad for q in requests)
        assert r.stats.skipped_shards == 2 and r.stats.skipped_samples == 2 * skipped
        requests_after_first = r.stats.requests
        r.read(requests)
        assert r.stats.requests == requests_after_first + len(dataset.shards) - 2  # bad shards are not asked again
    warnings = [rec.getMessage() for rec in caplog.records
                if rec.name == "d2v_train.data.reader" and rec.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(dataset.shards[n].name in " ".join(warnings) for n in bad)


def test_concurrent_reads_from_several_threads(built):
    out, dataset = built
    requests = all_requests(out, dataset)
    truth = expected(out, dataset)
    batches = [requests[i::4] for i in range(4)]
    results: dict[int, list] = {}
    with reader(out, dataset, threads=2) as r:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, r.read(batches[i]))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    for i, batch in enumerate(batches):
        check_bytes(results[i], batch, truth)


def test_errors_survive_pickling_and_so_does_the_reader(built):
    out, dataset = built
    error = pickle.loads(pickle.dumps(ShardError("shards/a.tar", "tar is missing")))
    assert error.shard == "shards/a.tar" and str(error) == "shard shards/a.tar: tar is missing"
    requests = all_requests(out, dataset)[:3]
    r = reader(out, dataset)
    r.read(requests)
    copy = pickle.loads(pickle.dumps(r))
    assert [s.data for s in copy.read(requests)] == [s.data for s in r.read(requests)]
    r.close()
    copy.close()


# --------------------------------------------------------------------------- local cache

def test_the_cache_downloads_each_shard_once_then_serves_reads_locally(built, tmp_path):
    out, dataset = built
    requests = all_requests(out, dataset)
    truth = expected(out, dataset)
    cache = tmp_path / "cache"
    # Many small reads of one shard at once: eight threads race for its first download.
    with reader(out, dataset, cache_dir=str(cache), max_request_bytes=1, threads=8) as r:
        check_bytes(r.read(requests), requests, truth)
        assert r.stats.bytes == sum(s.bytes for s in dataset.shards)  # every tar exactly once
        assert r.stats.requests == len(dataset.shards) and r.stats.cache_hits == len(requests)
    assert sorted(os.listdir(cache)) == sorted(f"{s.sha256}.tar" for s in dataset.shards)
    # A cleared cache is filled again.
    with reader(out, dataset, cache_dir=str(cache)) as r:
        r.read(requests[:1])
        for path in cache.iterdir():
            path.unlink()
        check_bytes(r.read(requests), requests, truth)
    # A later reader never touches the store.
    _, broken = flaky(Location(str(out)), failures=None)
    with reader(out, dataset, cache_dir=str(cache), open_fs=broken, **FAST) as r:
        check_bytes(r.read(requests), requests, truth)
        assert r.stats.requests == 0 and r.stats.cache_hits == len(dataset.shards)


def test_a_damaged_cached_copy_is_never_served(built, tmp_path):
    out, dataset = built
    requests = all_requests(out, dataset)
    cache = tmp_path / "cache"
    with reader(out, dataset, cache_dir=str(cache)) as r:
        r.read(requests)
    victim = cache / f"{dataset.shards[0].sha256}.tar"
    data = bytearray(victim.read_bytes())
    data[requests[0].data_offset] ^= 0xFF
    victim.write_bytes(bytes(data))
    # With the store unreachable the damage is an error naming the shard...
    _, broken = flaky(Location(str(out)), failures=None)
    with reader(out, dataset, cache_dir=str(cache), open_fs=broken, **FAST) as r:
        with pytest.raises(ShardError) as error:
            r.read(requests)
        assert error.value.shard == dataset.shards[0].name
    # ...with the store reachable the shard is fetched again, and the bytes are right.
    with reader(out, dataset, cache_dir=str(cache)) as r:
        check_bytes(r.read(requests), requests, expected(out, dataset))
        assert r.stats.bytes == dataset.shards[0].bytes
    assert victim.read_bytes() == (out / dataset.shards[0].name).read_bytes()


def test_a_shard_whose_checksum_differs_is_an_error_and_is_not_cached(built, tmp_path):
    out, dataset = built
    shards = shard_list(dataset)
    name, _, size = shards[0]
    shards[0] = (name, "0" * 64, size)
    cache = tmp_path / "cache"
    with ShardReader(Location(str(out)), shards, data_suffix="flac", cache_dir=str(cache)) as r:
        with pytest.raises(ShardError, match="checksum differs") as error:
            r.read(all_requests(out, dataset))
        assert error.value.shard == name
    assert not any(p.name.startswith("0" * 64) or p.suffix == ".tmp" for p in cache.iterdir())


# --------------------------------------------------------------------------- S3

@pytest.fixture
def s3_dataset(built, s3_server, s3_bucket):
    out, dataset = built
    fs = s3_server.filesystem()
    for path in out.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{s3_bucket}/ds/{path.relative_to(out)}", path.read_bytes())
    return Location(f"s3://{s3_bucket}/ds", storage_options=s3_server.storage_options()), out, dataset


@pytest.mark.s3
def test_s3_reads_are_identical_and_coalesced(s3_dataset, tmp_path):
    location, out, dataset = s3_dataset
    requests = all_requests(out, dataset)
    random.Random(1).shuffle(requests)
    truth = expected(out, dataset)
    with ShardReader(location, shard_list(dataset), data_suffix="flac") as r:
        check_bytes(r.read(requests), requests, truth)
        assert r.stats.requests == len(dataset.shards)
    with ShardReader(location, shard_list(dataset), data_suffix="flac", max_gap_bytes=0) as r:
        every_other = all_requests(out, dataset)[::2]  # a gap after every sample
        check_bytes(r.read(every_other), every_other, truth)
        assert r.stats.requests == len(every_other)
    with ShardReader(location, shard_list(dataset), data_suffix="flac", cache_dir=str(tmp_path / "c")) as r:
        check_bytes(r.read(requests), requests, truth)
        check_bytes(r.read(requests), requests, truth)
        assert r.stats.requests == len(dataset.shards) and r.stats.cache_hits == 2 * len(dataset.shards)


@pytest.mark.s3
def test_s3_missing_and_truncated_shards_are_named(s3_dataset, s3_server):
    location, out, dataset = s3_dataset
    fs = s3_server.filesystem()
    root = location.url[len("s3://"):]
    fs.rm_file(f"{root}/{dataset.shards[1].name}")
    fs.pipe_file(f"{root}/{dataset.shards[2].name}", (out / dataset.shards[2].name).read_bytes()[:1000])
    requests = all_requests(out, dataset)
    with ShardReader(location, shard_list(dataset), data_suffix="flac", **FAST) as r:
        with pytest.raises(ShardError, match="missing") as error:
            r.read([q for q in requests if q.shard == 1])
        assert error.value.shard == dataset.shards[1].name
        with pytest.raises(ShardError, match="truncated") as error:
            r.read([q for q in requests if q.shard == 2])
        assert error.value.shard == dataset.shards[2].name
        with pytest.raises(ShardError, match="truncated") as error:  # a range wholly past the end: HTTP 416
            r.read([[q for q in requests if q.shard == 2][-1]])
        assert error.value.shard == dataset.shards[2].name
        assert r.stats.retries == 0
    with ShardReader(location, shard_list(dataset), data_suffix="flac", skip_bad_shards=True, **FAST) as r:
        results = r.read(requests)
        assert [s is None for s in results] == [q.shard in (1, 2) for q in requests]


def test_a_request_has_the_index_span_columns_in_their_order():
    """The loader builds requests positionally from the index columns: the fields must line up."""
    from dataclasses import fields

    from schemas.arrow import SPAN_COLUMNS

    assert [f.name for f in fields(SampleRequest)] == ["shard", "key", *SPAN_COLUMNS, "payload_crc32"]
