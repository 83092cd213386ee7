"""All-gather sequence parallelism: every device gathers the whole sequence's K and V.

Device i holds contiguous chunk i of the sequence (`layout.CONTIGUOUS`). K, V and the
keys' segment ids and positions are all-gathered over the axis, then the local kernel
runs the local queries against every key. Masks use positions, so the gathered keys
need no reordering; a kernel that masks by token order (pallas) gets the queries'
offset i x T/S. The gather's transpose, a reduce-scatter, returns the K/V gradients
to their owners. Simplest of the modes; cheap with few kv heads (GQA), but every
device holds the full sequence's K/V.
"""
from __future__ import annotations

import jax

from efficient_train.parallel.sequence import LocalAttention, SequenceParallel


def attention(sp: SequenceParallel, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              positions: jax.Array, local: LocalAttention) -> jax.Array:
    """q [B, T/S, H, D], k, v [B, T/S, KV, D], ids [B, T/S] -> out [B, T/S, H, D]."""
    gather = lambda x: jax.lax.all_gather(x, sp.axis, axis=1, tiled=True)
    return local(q, gather(k), gather(v), segment_ids=segment_ids, positions=positions,
                 kv_segment_ids=gather(segment_ids), kv_positions=gather(positions),
                 q_offset=jax.lax.axis_index(sp.axis) * q.shape[1])
