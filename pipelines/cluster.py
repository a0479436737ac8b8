"""Where builder tasks run: a local Dask cluster, an existing scheduler, or in-process.

Each shard is one task. A local cluster binds to 127.0.0.1 only and has no dashboard.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class Runner:
    """Maps functions over items on a Dask client, or in this process when there is none."""

    def __init__(self, client=None) -> None:
        self.client = client

    @property
    def workers(self) -> int:
        if self.client is None:
            return 1
        return max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))

    def map(self, fn: Callable, items: list, **kwargs) -> list:
        """Results in the order of `items`."""
        return [result for _, result in sorted(self.as_completed(fn, items, **kwargs), key=lambda pair: pair[0])]

    def as_completed(self, fn: Callable, items: list, **kwargs) -> Iterator[tuple[int, Any]]:
        """(position, result) pairs as tasks finish; a task's exception is raised here."""
        if self.client is None:
            for position, item in enumerate(items):
                yield position, fn(item, **kwargs)
            return
        from distributed import as_completed

        # Arguments shared by every task (a source with its tokenizer, say) travel to each worker once.
        shared = {name: self.client.scatter(value, broadcast=True, hash=False) for name, value in kwargs.items()}
        futures = self.client.map(fn, items, pure=False, **shared)
        positions = {future.key: position for position, future in enumerate(futures)}
        for future in as_completed(futures):
            yield positions[future.key], future.result()
            future.release()


@contextlib.contextmanager
def runner(workers: int | None = None, scheduler: str | None = None) -> Iterator[Runner]:
    """`scheduler`: address of an existing Dask scheduler. `workers`: size of a local cluster
    (default: the number of CPUs); 0 runs every task in this process (no Dask)."""
    if scheduler and workers:
        raise ValueError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
    if scheduler:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        try:
            yield Runner(client)
        finally:
            client.close()
        return
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ValueError("--workers must be >= 0")
    if workers == 0:
        yield Runner(None)
        return
    from distributed import Client, LocalCluster

    # The in-process scheduler logs every worker's comings and goings at INFO: keep the console for progress.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with LocalCluster(**local_cluster_settings(workers), silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield Runner(client)


def local_cluster_settings(workers: int, *, threads_per_worker: int = 1) -> dict:
    """LocalCluster's arguments for a build on this machine: worker processes, everything bound to
    127.0.0.1 (an unauthenticated scheduler runs any task it is sent), no dashboards."""
    return {"n_workers": workers, "threads_per_worker": threads_per_worker, "processes": True, "host": "127.0.0.1",
            "dashboard_address": None, "worker_dashboard_address": None}


def progress(iterable: Iterable, *, total: int, description: str, unit: str = "shard"):
    """A progress bar with rates on a terminal; silent elsewhere (logs get a summary line)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, unit=unit, disable=None, dynamic_ncols=True)
