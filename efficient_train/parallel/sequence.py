"""Sequence parallelism at the attention dispatch: which mode runs, and the all-gather mode.

The train step runs the model inside a `jax.shard_map` that is manual over the
`sequence` axis, so every op but attention is naturally local to a device's slice of
the sequence. Attention is the one place that needs the other slices' keys and values.
While the step traces the model it opens `sharding(axis, mode)`; the attention
dispatch asks `active()` and, in `all_gather` mode, gathers K, V and the keys' segment
ids and positions over the axis (device i holds contiguous chunk i), then runs any
local kernel with the gathered keys. Masks use positions, never array indices, so
the gathered layout needs no reordering. The gather's transpose (a reduce-scatter)
returns the K/V gradients to their owners.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

import jax

_context = threading.local()


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    axis: str
    mode: str


@contextlib.contextmanager
def sharding(axis: str, mode: str) -> Iterator[None]:
    """While tracing inside the step's shard_map: the sequence is split over `axis`."""
    previous = getattr(_context, "value", None)
    _context.value = SequenceParallel(axis, mode)
    try:
        yield
    finally:
        _context.value = previous


def active() -> SequenceParallel | None:
    return getattr(_context, "value", None)


def all_gather_keys(
    sp: SequenceParallel, k: jax.Array, v: jax.Array, segment_ids: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """K, V [B, S/n, KV, D] and ids [B, S/n] -> the whole sequence's, gathered over the axis."""
    gather = lambda x: jax.lax.all_gather(x, sp.axis, axis=1, tiled=True)
    return gather(k), gather(v), gather(segment_ids), gather(positions)
