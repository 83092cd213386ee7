"""Timing the benchmarks share: the median wall time of a JAX call, the device synchronized.

A sibling module (imported as `timing`: a script's own folder is first on sys.path), so each
benchmark stays runnable as `python benchmarks/NAME.py` from anywhere.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable, args: tuple, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of `fn(*args)` over `repeats` calls, after `warmup` untimed ones,
    each waited on with `jax.block_until_ready`."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
