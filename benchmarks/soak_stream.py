"""Soak: stream a dataset from the S3 server through the fault-injecting proxy for a bounded time,
faults injected at a steady rate, and check what a week-long run depends on: every sample of
every epoch delivered exactly once (keys against the epoch plan), resident memory flat after
warm-up, and how often and how long the reads that needed retries took.

    .venv/bin/python benchmarks/soak_stream.py [--minutes 30] [--fault-rate 0.05] [--json FILE]

Starts its own S3 server (tests/s3server.py: radosgw, else moto) and proxy (tests/faultproxy.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.corpora import speech_corpus  # noqa: E402
from d2v_train.data import reader as reader_module  # noqa: E402
from d2v_train.data.loader import StreamingLoader  # noqa: E402
from d2v_train.data.plan import BatchPolicy  # noqa: E402
from pipelines.build import BuildOptions, build_dataset  # noqa: E402
from pipelines.plan import ShardSize  # noqa: E402
from pipelines.sources.librispeech import LibriSpeechSource  # noqa: E402
from pipelines.storage import Location  # noqa: E402
from tests.faultproxy import KINDS, FaultProxyProcess, Faults  # noqa: E402
from tests.s3server import s3_server  # noqa: E402

SPLIT = "train-clean-100"
POLICY = BatchPolicy(max_tokens=400_000, min_sample_size=16_000, max_sample_size=160_000, shuffle_block=2)


class ReadTimes:
    """Each ranged read's duration, and whether it needed a retry (counted per thread)."""

    def __init__(self) -> None:
        self.plain: list[float] = []
        self.retried: list[float] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def install(self) -> None:
        times, cat, add = self, reader_module.ShardReader._cat, reader_module.ReaderStats.add

        def counting_add(stats, **counts):
            if counts.get("retries"):
                times._local.retries = getattr(times._local, "retries", 0) + counts["retries"]
            return add(stats, **counts)

        def timed_cat(reader, index, start, end):
            before, began = getattr(times._local, "retries", 0), time.perf_counter()
            try:
                return cat(reader, index, start, end)
            finally:
                took = time.perf_counter() - began
                with times._lock:
                    (times.retried if getattr(times._local, "retries", 0) > before else times.plain).append(took)

        reader_module.ReaderStats.add = counting_add
        reader_module.ShardReader._cat = timed_cat


def rss_sampler(samples: list[tuple[float, int]], stop: threading.Event, every_s: float) -> None:
    process = psutil.Process()
    started = time.monotonic()
    while not stop.wait(every_s):
        samples.append((time.monotonic() - started, process.memory_info().rss))


def soak(args, server, scratch: Path) -> dict:
    spec, _ = speech_corpus(scratch / "corpus", args.utterances)
    bucket = server.make_bucket()
    url = f"s3://{bucket}/data"
    build_dataset(LibriSpeechSource(Location(spec.source), (SPLIT,)), Location(url, server.storage_options()),
                  BuildOptions(ShardSize.parse("16MB"), 2, 0), workers=0, echo=lambda *_: None)
    rate = args.fault_rate / len(KINDS)
    faults = Faults(**{kind: rate for kind in KINDS}, latency_s=0.5, stall_s=args.read_timeout + 2)
    os.environ["D2V_S3_READ_TIMEOUT"] = str(args.read_timeout)
    times = ReadTimes()
    times.install()
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=rss_sampler, args=(rss, stop, args.rss_every), daemon=True)
    epochs, failures, delivered = [], [], 0
    proxy = FaultProxyProcess(server.endpoint_url, faults, seed=args.seed)  # its memory is not this process's
    with proxy:
        options = server.storage_options()
        options["client_kwargs"] = {"endpoint_url": proxy.endpoint_url}
        loader = StreamingLoader(Location(url, options), SPLIT, POLICY, seed=args.seed, workers=args.workers,
                                 retries=args.retries)
        planned_sizes = {}
        sampler.start()
        started = time.monotonic()
        if args.trace_allocations:
            tracemalloc.start(12)
        warm_snapshot = None
        while time.monotonic() - started < args.minutes * 60:
            if args.trace_allocations and warm_snapshot is None and time.monotonic() - started >= args.minutes * 12:
                warm_snapshot = tracemalloc.take_snapshot()  # after the first fifth: warm-up
            epoch = loader.epoch
            plan = loader.plan(epoch)
            planned = Counter(loader.index.columns["key"][i] for g in range(len(plan)) for i in plan[g].samples)
            planned_sizes[epoch] = sum(planned.values())
            got: Counter = Counter()
            for batch in loader:
                got.update(batch["keys"])
            delivered += sum(got.values())
            missing, repeated = planned - got, got - planned
            epochs.append({"epoch": epoch, "planned": sum(planned.values()), "delivered": sum(got.values()),
                           "missing": sum(missing.values()), "extra": sum(repeated.values()),
                           "seconds": round(time.monotonic() - started, 1)})
            if missing or repeated:
                failures.append(epochs[-1])
            print(f"epoch {epoch}: {sum(got.values())}/{sum(planned.values())} samples, retries "
                  f"{loader.reader.stats.retries}, RSS {rss[-1][1] / 2**20 if rss else 0:.1f} MB", flush=True)
        elapsed = time.monotonic() - started
        growth = _python_growth(warm_snapshot) if warm_snapshot is not None else None
        stats = loader.reader.stats.as_dict()
        loader.close()
    requests, counts = proxy.requests, dict(proxy.counts)
    stop.set()
    sampler.join()
    server.remove_bucket(bucket)
    # warm-up: the first fifth; growth: the median of the second fifth against the last fifth's
    warm = [r for t, r in rss if elapsed * 0.2 <= t < elapsed * 0.4]
    end = [r for t, r in rss if t >= elapsed * 0.8]
    first, last = (float(np.median(warm)), float(np.median(end))) if warm and end else (0.0, 0.0)
    after = np.array([(t, r) for t, r in rss if t >= elapsed * 0.2], dtype=float)  # the trend past warm-up
    slope = float(np.polyfit(after[:, 0] / 3600, after[:, 1] / 2**20, 1)[0]) if len(after) > 2 else None
    minute = max(1, round(60 / args.rss_every))
    return {
        "minutes": round(elapsed / 60, 2), "epochs": len(epochs), "samples_planned": sum(e["planned"] for e in epochs),
        "samples_delivered": delivered, "epochs_with_missing_or_duplicates": len(failures), "failures": failures,
        "proxy_requests": requests, "faults": counts, "fault_rate": args.fault_rate, "reader": stats,
        "rss_mb": {"warm": round(first / 2**20, 1), "end": round(last / 2**20, 1),
                   "growth_pct": round(100 * (last - first) / first, 2) if first else None,
                   "max": round(max(r for _, r in rss) / 2**20, 1) if rss else None, "samples": len(rss),
                   "slope_mb_per_hour_after_warm_up": round(slope, 1) if slope is not None else None,
                   "trace": [[round(t / 60, 1), round(r / 2**20, 1)] for t, r in rss[minute - 1::minute]]},
        **({"python_heap_growth_after_warm_up": growth} if growth is not None else {}),
        "reads": {"plain": len(times.plain), "retried": len(times.retried),
                  "plain_p50_ms": _ms(times.plain, 50), "plain_p99_ms": _ms(times.plain, 99),
                  "retried_p50_ms": _ms(times.retried, 50), "retried_p99_ms": _ms(times.retried, 99)},
    }


def _python_growth(warm) -> dict:
    """What Python objects grew by since `warm` (tracemalloc): the total and the top allocation sites."""
    now = tracemalloc.take_snapshot()
    tracemalloc.stop()
    keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = now.filter_traces(keep).compare_to(warm.filter_traces(keep), "traceback")
    return {"total_mb": round(sum(d.size_diff for d in diff) / 2**20, 2),
            "top": [{"mb": round(d.size_diff / 2**20, 3), "blocks": d.count_diff,
                     "where": [f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
                               for frame in list(d.traceback)[-4:]]} for d in diff[:8]]}


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to stream (default 30)")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of GETs disturbed, kinds in equal parts")
    parser.add_argument("--utterances", type=int, default=300, help="size of the generated corpus (5-15 s each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--retries", type=int, default=8)
    parser.add_argument("--read-timeout", type=float, default=2.0, help="the client's; stalls last 2 s longer")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-allocations", action="store_true",
                        help="diagnose memory growth: tracemalloc's top Python allocation sites that grew after "
                             "warm-up (slows the run)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, s3_server() as server:
        result = soak(args, server, Path(tmp))
    result.update(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                  s3_server=server.kind)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(1 if result["epochs_with_missing_or_duplicates"] else 0)


if __name__ == "__main__":
    main()
