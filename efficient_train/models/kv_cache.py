"""The KV cache of one layer while decoding: the hook through which attention reads and extends it.

Decoding (efficient_train/generate) runs each decoder layer with a `LayerCache` held
(`caching(cache)`); the model's one attention entry point (`models.attention`) asks
`active()` and, when a cache is held, writes the new tokens' keys and values into it at
`index` and attends the queries to every cached token instead of only to their own. The
blocks themselves are unchanged, so a decoded token's computation is the training
forward's, which the tests check position by position.

The cache is [B, S, KV, D] per layer with the segment ids and positions of its S slots;
masking is attention's own rule (same segment, segment not 0, key position <= query
position), so unwritten slots (segment 0) and left padding are never attended.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager

import jax

from efficient_train.parallel.context import TracingContext
from efficient_train.parallel.sequence import LocalAttention


@dataclasses.dataclass
class LayerCache:
    """One layer's keys and values [B, S, KV, D], and every slot's segment id and position [B, S]
    (the new tokens' already written); `index` is the slot the call's first token goes to.
    `attend` replaces k and v with the extended cache, which the decoder then carries on."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array, positions: jax.Array,
               local: LocalAttention) -> jax.Array:
        """Write k, v [B, T, KV, D] at `index`, then q [B, T, H, D] attends to the whole cache."""
        start = (0, self.index, 0, 0)
        self.k = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start)
        self.v = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start)
        return local(q, self.k, self.v, segment_ids=segment_ids, positions=positions,
                     kv_segment_ids=self.segment_ids, kv_positions=self.positions, q_offset=0)


_CACHE: TracingContext[LayerCache] = TracingContext("KV cache")


def caching(cache: LayerCache) -> AbstractContextManager[None]:
    """While tracing one layer's decode: its attention reads and extends `cache`."""
    return _CACHE.holding(cache)


def active() -> LayerCache | None:
    return _CACHE.current()
