"""Sequence parallelism's context: which mode runs, over which axis, and what a mode needs.

The train step runs the model inside a `jax.shard_map` that is manual over the
`sequence` axis, so every op but attention is naturally local to a device's slice of
the sequence. Attention is the one place that needs the other slices' tokens. While
the step traces the model it opens `sharding(axis, mode)`; the model's attention
dispatch (`models.attention`) asks `active()` and hands the work to the mode's module:
`all_gather`, `ulysses` or `ring` (this package), each a function of local q, k, v
[B, T/S, H|KV, D] and the local tokens' segment ids and positions.

Modes that end in one ordinary attention call (all_gather, ulysses) take that call
from the dispatch as a `LocalAttention`, so any local kernel (xla, cudnn, pallas) runs
inside them; ring attention needs per-block log-sum-exps and calls the flash kernel
(`pallas_kernels.flash_attention`, whose 'xla' backend is plain JAX) itself.
The token layout each mode expects its batches in is `parallel.layout`'s business.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from typing import Protocol

import jax

from efficient_train.parallel.context import TracingContext


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    axis: str
    mode: str


class LocalAttention(Protocol):
    """One device's attention of queries against keys (the dispatch's local kernels).

    q [B, T, H, D], k and v [B, S, KV, D]; ids int [B, T] and [B, S] (kv ids None: the
    keys are the queries' own tokens). `q_offset`: index of the first query among the
    keys in token order, for kernels whose causal mask comes from token order (pallas).
    """

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array,
                 positions: jax.Array, kv_segment_ids: jax.Array | None,
                 kv_positions: jax.Array | None, q_offset: int | jax.Array) -> jax.Array: ...


_SPLIT: TracingContext[SequenceParallel] = TracingContext("sequence split")


def sharding(axis: str, mode: str) -> AbstractContextManager[None]:
    """While tracing inside the step's shard_map: the sequence is split over `axis`."""
    return _SPLIT.holding(SequenceParallel(axis, mode))


def active() -> SequenceParallel | None:
    return _SPLIT.current()
