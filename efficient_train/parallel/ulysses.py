"""Ulysses sequence parallelism (DeepSpeed-Ulysses): trade sequence shards for head shards.

Device i holds contiguous chunk i of the sequence (`layout.CONTIGUOUS`) for all heads.
An all-to-all over the axis turns q, k, v [B, T/S, H, D] into [B, T, H/S, D]: the whole
sequence for 1/S of the heads. Any local kernel (the dispatch's xla, cudnn or pallas)
then runs ordinary self-attention on those heads, and a second all-to-all turns the
output back into sequence shards. Autodiff's transpose of an all-to-all is the
reverse all-to-all, so the backward is the same four exchanges. Per device each
all-to-all moves (S-1)/S of a local tensor: the traffic stays constant when S and the
sequence length grow together, and the full sequence of activations is never
gathered (only the int32 segment ids and positions are, [B, T] each).

Heads: H must be divisible by S. Device d gets query heads [d H/S, (d+1) H/S), which
read kv heads [d KV/S, (d+1) KV/S) when S divides KV. With fewer kv heads than S
(GQA), each kv head is repeated S/KV times before the exchange (S must then be a
multiple of KV), so device d gets repeated head d, i.e. original head d // (S/KV),
exactly the one its query heads read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_train.parallel.heads import ulysses_head_problem
from efficient_train.parallel.sequence import LocalAttention, SequenceParallel


def check_heads(num_heads: int, num_kv_heads: int, size: int) -> str | None:
    """Why Ulysses cannot split these heads over `size` devices; None if it can."""
    problem = ulysses_head_problem(num_heads, num_kv_heads, size)
    if problem == "num_heads":
        return f"model.num_heads={num_heads} is not divisible by mesh.sequence={size}"
    if problem == "num_kv_heads":
        return (f"model.num_kv_heads={num_kv_heads} neither divides nor is divisible by "
                f"mesh.sequence={size}")
    return None


def attention(sp: SequenceParallel, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              positions: jax.Array, local: LocalAttention) -> jax.Array:
    """q [B, T/S, H, D], k, v [B, T/S, KV, D], ids [B, T/S] -> out [B, T/S, H, D]."""
    size = jax.lax.axis_size(sp.axis)
    kv_heads = k.shape[2]
    problem = check_heads(q.shape[2], kv_heads, size)
    if problem:
        raise ValueError(f"sequence_parallel.mode 'ulysses': {problem}; use 'ring' or 'all_gather'")
    if kv_heads < size:
        k, v = (jnp.repeat(x, size // kv_heads, axis=2) for x in (k, v))
    to_heads = lambda x: jax.lax.all_to_all(x, sp.axis, split_axis=2, concat_axis=1, tiled=True)
    gather = lambda x: jax.lax.all_gather(x, sp.axis, axis=1, tiled=True)
    out = local(to_heads(q), to_heads(k), to_heads(v), segment_ids=gather(segment_ids),
                positions=gather(positions), kv_segment_ids=None, kv_positions=None, q_offset=0)
    return jax.lax.all_to_all(out, sp.axis, split_axis=1, concat_axis=2, tiled=True)
