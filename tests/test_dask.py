"""Shard builders on real Dask clusters: a local one, and an existing scheduler given by address."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.storage import Location
from tests.helpers import read_dataset_json, run_d2v

pytestmark = [pytest.mark.dask, pytest.mark.slow]



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic.make_imagenet(str(tmp_path_factory.mktemp("imagenet")), classes=3, train_per_class=6, seed=9,
                                   faults=True)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    dataset = build_dataset(ImageNetSource(Location(corpus.source)), Location(str(out)),
                            BuildOptions(ShardSize.parse("4"), 2, 0), workers=0, echo=lambda *_: None)
    return [(s.name, s.sha256) for s in dataset.shards]


@pytest.fixture
def scheduler(tmp_path):
    """`dask scheduler` and one `dask worker` as separate processes on 127.0.0.1, like a user's cluster."""
    scheduler_file = tmp_path / "scheduler.json"
    processes = [subprocess.Popen(
        ["dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
         "--scheduler-file", str(scheduler_file)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        processes.append(subprocess.Popen(
            ["dask", "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1", "--nworkers", "1",
             "--nthreads", "1", "--dashboard-address", "127.0.0.1:0", "--no-nanny"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()))
        import json

        from distributed import Client

        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def _env() -> dict:
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def test_existing_scheduler_by_address_builds_the_same_shards(corpus, reference, scheduler, tmp_path):
    out = tmp_path / "out"
    result = run_d2v("data", "build", "imagenet", corpus.source, str(out), "--shard-size", "4",
                     "--mask-variants", "2", "--scheduler", scheduler)
    assert "on 1 worker(s)" in result.stdout
    assert [(s["name"], s["sha256"]) for s in read_dataset_json(out)["shards"]] == reference
    from distributed import Client

    with Client(scheduler) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "build_shard" in prefixes, prefixes


def test_local_cluster_builds_the_same_shards(corpus, reference, tmp_path):
    out = tmp_path / "out"
    result = run_d2v("data", "build", "imagenet", corpus.source, str(out), "--shard-size", "4",
                     "--mask-variants", "2", "--workers", "2")
    assert "on 2 worker(s)" in result.stdout
    assert [(s["name"], s["sha256"]) for s in read_dataset_json(out)["shards"]] == reference


def test_an_unreachable_scheduler_is_a_clear_error(corpus, tmp_path):
    result = run_d2v("data", "build", "imagenet", corpus.source, str(tmp_path / "out"),
                     "--scheduler", "tcp://127.0.0.1:9", check=False, timeout=120)
    assert result.returncode == 2 and "Dask scheduler at tcp://127.0.0.1:9" in result.stderr
