"""Timing shared by the benchmarks."""
from __future__ import annotations

import time


def best_seconds(fns: dict, repeats: int, *, warm_up: bool = False) -> dict[str, float]:
    """Best wall time of each function; runs are interleaved so that load from other processes
    hits every function alike (the minimum is the least disturbed run). `warm_up` runs each
    once untimed first (lazy initialisation, caches)."""
    best = {name: float("inf") for name in fns}
    if warm_up:
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
