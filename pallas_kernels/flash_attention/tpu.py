"""Flash attention on TPUs: Pallas kernels compiled by Mosaic.

Owns the TPU forward, dq and dk/dv kernels. Shaped the TPU way rather than the GPU way:
the reduction axis is the last grid axis ('arbitrary'), Mosaic pipelines the block
copies from HBM, and running sums live in VMEM scratch, initialized on the first step
and written out on the last. Blocks that see nothing are skipped with `pl.when` (their
copies still happen; kept simple, as this kernel is only lowered, never run, here).
- layout [B, H, T, D] (transposed by the caller here) so that each block's two minor
  dimensions are (sequence, head_dim), as Mosaic tiles them;
- the offsets arrive as scalar-prefetch operands (SMEM), so they may be traced;
- row statistics (lse, delta, query segment ids) are [.., T, 1] columns and key
  segment ids [B, 1, S] rows, so masks broadcast without in-kernel transposes;
- dk/dv: grid (B, KV, kv blocks, group, q blocks), accumulating over the GQA group.
Every score block is masked (causal, window, segments, key padding) with 2-D iotas; a
sliding window (offsets[2], traced) also skips the key blocks wholly behind it.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.reference import effective_window, visible
from pallas_kernels.kernel_math import NT, TN, dot


def _window(offsets_ref, windowed: bool) -> jax.Array | None:
    return effective_window(offsets_ref[2]) if windowed else None


def _masked_scores(q, k, offsets_ref, i, j, q_seg_ref, kv_seg_ref, *, scale: float,
                   causal: bool, windowed: bool, kv_len: int) -> jax.Array:
    """Scaled scores [block_q, block_kv] of query block i and key block j, -inf where
    masked."""
    block_q, block_kv = q.shape[0], k.shape[0]
    s = dot(q, k, NT) * scale
    shape = (block_q, block_kv)
    key = j * block_kv + lax.broadcasted_iota(jnp.int32, shape, 1)
    q_pos = offsets_ref[0] + i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    mask = key < kv_len
    seen = visible(q_pos, offsets_ref[1] + key,
                   None if q_seg_ref is None else q_seg_ref[...],
                   None if kv_seg_ref is None else kv_seg_ref[...], causal=causal,
                   window=_window(offsets_ref, windowed))
    if seen is not None:
        mask &= seen
    return jnp.where(mask, s, -jnp.inf)


def _overlaps(offsets_ref, i, j, block_q: int, block_kv: int, causal: bool,
              windowed: bool) -> jax.Array:
    """Whether query block i can see anything of key block j (causality and window only)."""
    if not causal:
        return jnp.bool_(True)
    q_first, kv_first = offsets_ref[0] + i * block_q, offsets_ref[1] + j * block_kv
    seen = kv_first <= q_first + block_q - 1
    if windowed:  # the block's last key is within the first query's window
        seen &= q_first - (kv_first + block_kv - 1) < _window(offsets_ref, windowed)
    return seen


def _fwd_kernel(offsets_ref, q_ref, k_ref, v_ref, *refs, scale: float, causal: bool,
                windowed: bool, segmented: bool, kv_len: int) -> None:
    if segmented:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), q_seg_ref, kv_seg_ref = refs, None, None
    i, j = pl.program_id(2), pl.program_id(3)
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(_overlaps(offsets_ref, i, j, block_q, block_kv, causal, windowed))
    def _step():
        s = _masked_scores(q_ref[...], k_ref[...], offsets_ref, i, j, q_seg_ref, kv_seg_ref,
                           scale=scale, causal=causal, windowed=windowed, kv_len=kv_len)
        m = m_ref[...]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
        alpha = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + dot(p.astype(v_ref.dtype), v_ref[...])
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        denom = l_ref[...]
        seen = denom > 0.0
        denom = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_ref[...] / denom).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(denom), -jnp.inf)


def _dq_kernel(offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               scale: float, causal: bool, windowed: bool, segmented: bool,
               kv_len: int) -> None:
    if segmented:
        q_seg_ref, kv_seg_ref, dq_ref, acc_ref = refs
    else:
        (dq_ref, acc_ref), q_seg_ref, kv_seg_ref = refs, None, None
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(_overlaps(offsets_ref, i, j, q_ref.shape[0], k_ref.shape[0], causal, windowed))
    def _step():
        k = k_ref[...]
        s = _masked_scores(q_ref[...], k, offsets_ref, i, j, q_seg_ref, kv_seg_ref,
                           scale=scale, causal=causal, windowed=windowed, kv_len=kv_len)
        p = jnp.exp(s - lse_ref[...])
        ds = p * (dot(do_ref[...], v_ref[...], NT) - delta_ref[...])
        acc_ref[...] += dot(ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                scale: float, causal: bool, windowed: bool, segmented: bool,
                kv_len: int) -> None:
    if segmented:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    else:
        (dk_ref, dv_ref, dk_acc, dv_acc), q_seg_ref, kv_seg_ref = refs, None, None
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(_overlaps(offsets_ref, i, j, q_ref.shape[0], k_ref.shape[0], causal, windowed))
    def _step():
        q, do = q_ref[...], do_ref[...]
        s = _masked_scores(q, k_ref[...], offsets_ref, i, j, q_seg_ref, kv_seg_ref,
                           scale=scale, causal=causal, windowed=windowed, kv_len=kv_len)
        p = jnp.exp(s - lse_ref[...])
        dv_acc[...] += dot(p.astype(do.dtype), do, TN)
        ds = p * (dot(do, v_ref[...], NT) - delta_ref[...])
        dk_acc[...] += dot(ds.astype(q.dtype), q, TN)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _heads_major(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2)


def _seg_operands(q_seg: jax.Array | None, kv_seg: jax.Array | None) -> list[jax.Array]:
    if q_seg is None or kv_seg is None:  # both or neither (api.py checks)
        return []
    return [q_seg[:, :, None], kv_seg[:, None, :]]


def _seg_specs(segmented: bool, q_block: int, kv_block: int, q_index, kv_index) -> list:
    """Specs of q segment ids [B, T, 1] and kv segment ids [B, 1, S]; the index maps
    give (batch, block) from the grid indices."""
    if not segmented:
        return []
    return [pl.BlockSpec((None, q_block, 1), lambda *a: (*q_index(*a), 0)),
            pl.BlockSpec((None, 1, kv_block),
                         lambda *a: (kv_index(*a)[0], 0, kv_index(*a)[1]))]


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, semantics,
          interpret: bool, name: str):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret,
        name=name,
    )


def forward(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
            kv_seg: jax.Array | None, offsets: jax.Array, *, scale: float, causal: bool,
            windowed: bool, kv_len: int, block_q: int, block_kv: int,
            interpret: bool) -> tuple[jax.Array, jax.Array]:
    """out [B, T, H, D] and natural-log lse [B, H, T] (-inf for rows that see nothing)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    groups = h // kvh
    segmented = q_seg is not None
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, o: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, d),
                           lambda bi, hi, i, j, o: (bi, lax.div(hi, groups), j, 0))
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda bi, hi, i, j, o: (bi, hi, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec] + _seg_specs(
        segmented, block_q, block_kv, lambda bi, hi, i, j, o: (bi, i),
        lambda bi, hi, i, j, o: (bi, j))
    out, lse = _call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, windowed=windowed,
                          segmented=segmented, kv_len=kv_len),
        grid=(b, h, t // block_q, s // block_kv),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((b, h, t, d), q.dtype),
                   jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
        scratch=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                 pltpu.VMEM((block_q, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="flash_attention_fwd_tpu",
    )(offsets, _heads_major(q), _heads_major(k), _heads_major(v),
      *_seg_operands(q_seg, kv_seg))
    return _heads_major(out), lse[..., 0]


def backward(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
             kv_seg: jax.Array | None, offsets: jax.Array, do: jax.Array,
             lse: jax.Array, delta: jax.Array, *, scale: float, causal: bool, windowed: bool,
             kv_len: int,
             block_q_dq: int, block_kv_dq: int, block_q_dkv: int, block_kv_dkv: int,
             interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv. lse [B, H, T] must be +inf (not -inf) on rows that see nothing;
    delta [B, H, T] = rowsum(out * dout) - dlse (folds in the lse cotangent)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    groups = h // kvh
    segmented = q_seg is not None
    kernel_args: dict[str, Any] = dict(scale=scale, causal=causal, windowed=windowed, segmented=segmented,
                       kv_len=kv_len)
    operands = (offsets, _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(do),
                lse[..., None], delta[..., None], *_seg_operands(q_seg, kv_seg))

    bq, bk = block_q_dq, block_kv_dq
    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, o: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda bi, hi, i, j, o: (bi, lax.div(hi, groups), j, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, o: (bi, hi, i, 0))
    dq = _call(
        functools.partial(_dq_kernel, **kernel_args),
        grid=(b, h, t // bq, s // bk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + _seg_specs(
            segmented, bq, bk, lambda bi, hi, i, j, o: (bi, i),
            lambda bi, hi, i, j, o: (bi, j)),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, t, d), q.dtype),
        scratch=[pltpu.VMEM((bq, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="flash_attention_dq_tpu",
    )(*operands)

    bq, bk = block_q_dkv, block_kv_dkv
    q_spec = pl.BlockSpec((None, None, bq, d),
                          lambda bi, kh, j, g, i, o: (bi, kh * groups + g, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, kh, j, g, i, o: (bi, kh, j, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1),
                            lambda bi, kh, j, g, i, o: (bi, kh * groups + g, i, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, **kernel_args),
        grid=(b, kvh, s // bk, groups, t // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + _seg_specs(
            segmented, bq, bk, lambda bi, kh, j, g, i, o: (bi, i),
            lambda bi, kh, j, g, i, o: (bi, j)),
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct((b, kvh, s, d), k.dtype),
                   jax.ShapeDtypeStruct((b, kvh, s, d), v.dtype)],
        scratch=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=interpret,
        name="flash_attention_dkv_tpu",
    )(*operands)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
