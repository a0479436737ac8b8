"""Epoch planning at the size of real corpora: a speech dataset's metadata (dataset.json and one
Parquet index per shard of 1,000 utterances, no payload; pipelines/synthetic/scale.py) of 100k,
1M and 10M samples, opened by the loader the trainer uses, which plans one epoch for rank 3 of 64
and makes its first batch's read requests (the spans and checksums of its samples; the payload
reads themselves are what bench_loader.py measures). The split is opened from its plan file (one
read) and, for comparison, as a build without plan files would be: one read per index file. Each size is measured in a fresh process:
seconds to open the index, to plan the epoch, to the first batch's requests, and peak RSS.
With --s3 the largest size is also read from a local S3 server (radosgw on 127.0.0.1, as the
tests start it; moto's server where radosgw is missing).

    .venv/bin/python benchmarks/bench_planning.py [--out /tmp/d2v-planning] [--sizes 100000,1000000,10000000] [--s3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_SHARD = 1000
RANK, WORLD = 3, 64


def measure(url: str) -> dict:
    """Open, plan and make the first batch's requests as the trainer's loader does (this process)."""
    from d2v_train.data.loader import _REQUEST_COLUMNS, StreamingLoader
    from d2v_train.data.plan import BatchPolicy, rank_batch_numbers

    started = time.perf_counter()
    loader = StreamingLoader(url, "train", BatchPolicy(max_tokens=1_400_000), rank=RANK, world_size=WORLD)
    opened = time.perf_counter()
    batches = len(loader)  # plans the epoch
    planned = time.perf_counter()
    plan = loader.plan(0)
    first, _ = rank_batch_numbers(len(plan), 0, RANK, WORLD, "drop")[0]
    fields = loader.index.gather(plan[first].samples, ("shard", "key", *_REQUEST_COLUMNS))
    requested = time.perf_counter()
    loader.close()
    return {"samples": len(loader.index), "shards": len(loader.index.shards), "global_batches": len(plan),
            "rank_batches": batches, "first_batch_samples": len(fields[0]),
            "open_s": round(opened - started, 3), "plan_s": round(planned - opened, 3),
            "first_batch_s": round(requested - planned, 3), "total_s": round(requested - started, 3),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def _measured(url: str, env: dict | None = None) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure", url], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode:
        raise RuntimeError(f"measuring {url} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _generated(out: Path, samples: int) -> str:
    from pipelines.synthetic.scale import make_index_only_dataset

    folder = out / f"speech-{samples}"
    if not (folder / "dataset.json").exists():
        started = time.perf_counter()
        make_index_only_dataset(str(folder), shards=samples // PER_SHARD, samples_per_shard=PER_SHARD)
        print(f"generated {samples:,} samples in {time.perf_counter() - started:.0f} s at {folder}", flush=True)
    return str(folder)


def _without_plan_files(folder: str) -> str:
    """The same dataset as a build without plan files saw it (an older d2v): every index file read."""
    source = Path(folder)
    older = source.with_name(source.name + "-indexes-only")
    if not (older / "dataset.json").exists():
        older.mkdir(exist_ok=True)
        doc = json.loads((source / "dataset.json").read_text())
        for split in doc["splits"].values():
            split.pop("plan", None)
            split.pop("plan_sha256", None)
        if not (older / "index").exists():
            (older / "index").symlink_to(source / "index")
        (older / "dataset.json").write_text(json.dumps(doc))
    return str(older)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/d2v-planning", help="where the generated metadata is kept")
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="samples per dataset, comma-separated")
    parser.add_argument("--s3", action="store_true", help="also read the largest from a local S3 server")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    for samples in sizes:
        folder = _generated(out, samples)
        for store, url in (("local", folder), ("local, every index file (no plan file)", _without_plan_files(folder))):
            row = {"store": store, **_measured(url)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.s3:
        from tests.s3server import s3_server

        with s3_server() as server:
            bucket = server.make_bucket()
            samples = max(sizes)
            url = f"s3://{bucket}/speech-{samples}"
            started = time.perf_counter()
            local = Path(_generated(out, samples))
            server.filesystem().put(str(local) + "/", url, recursive=True)
            print(f"uploaded {samples:,} samples' metadata in {time.perf_counter() - started:.0f} s", flush=True)
            row = {"store": f"s3 ({server.kind})", **_measured(url, server.env())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"rank {RANK} of {WORLD}, max_tokens 1,400,000")
    print("| store | samples | shards | open s | plan s | first batch s | total s | s per 1M | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['samples']:,} | {r['shards']:,} | {r['open_s']} | {r['plan_s']} | "
              f"{r['first_batch_s']} | {r['total_s']} | {r['total_s'] / r['samples'] * 1e6:.2f} | {r['peak_rss_mb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
