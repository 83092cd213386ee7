"""Flash attention on NVIDIA GPUs: Pallas kernels compiled by Triton.

Owns the three GPU kernels (forward, dq, dk/dv; FlashAttention-2 style) and their
launch. Shaped so because Triton wants one program per output tile, with the reduction
axis as an in-kernel loop:
- forward and dq: grid (q blocks, batch, heads); each program walks the key blocks.
  The q-block axis is walked in reverse so the longest causal rows start first.
- dk/dv: grid (kv blocks, batch, kv heads); each program walks every query head of its
  GQA group and the query blocks, so dk/dv come out per kv head with no extra reduction.
Each loop is split into a part that needs no mask (blocks that are fully visible) and a
masked part (the causal diagonal, segment ids, key padding), with bounds computed in the
kernel from the (traced) offsets, so blocks that see nothing are skipped. A sliding
window (offsets[2], traced, so one compiled kernel serves windowed and global layers
of a scan) adds a masked stretch at the window's far edge, and the blocks beyond it
are skipped too: a windowed row costs O(window), not O(position).

Inputs arrive padded (sequence lengths to multiples of the blocks, head_dim to a power
of two) by api.py; `kv_len` is the true key length, keys beyond it are masked. Softmax is
computed in base 2 (exp2) with log2(e) folded into the scale; the log-sum-exp leaves and
enters in natural log. `pallas_call` gets Triton compiler params explicitly: without them
it may select Mosaic GPU.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.reference import effective_window, visible
from pallas_kernels.kernel_math import NT, cdiv, dot

_LOG2E = math.log2(math.e)


def kv_block_range(q_first: jax.Array, q_last: jax.Array, kv_offset: jax.Array,
                   window: jax.Array | None, *, causal: bool, segmented: bool, kv_len: int,
                   block_kv: int, num_kv_blocks: int) -> tuple[jax.Array, ...]:
    """(start, mid, lo, hi): key blocks [start, mid) need a mask (the window's far edge),
    [mid, lo) none, [lo, hi) one (diagonal, segments, padding); the rest are invisible.

    For the query rows at global positions q_first..q_last; `window` is effective
    (reference.effective_window) or None.
    """
    zero = jnp.int32(0)
    hi = jnp.int32(num_kv_blocks)
    lo = jnp.int32(0 if segmented else kv_len // block_kv)  # blocks free of key padding
    if causal:
        # Blocks whose first key is <= q_last are (partly) visible; blocks whose last key
        # is <= q_first are fully visible.
        hi = jnp.minimum(cdiv(jnp.maximum(q_last - kv_offset + 1, zero), block_kv), hi)
        lo = jnp.minimum(lax.div(jnp.maximum(q_first - kv_offset + 1, zero), block_kv), lo)
    lo = jnp.minimum(lo, hi)
    if window is None:
        return zero, zero, lo, hi
    # The first key some row sees is q_first - window + 1; every row sees the keys from
    # q_last - window + 1 on.
    start = jnp.minimum(lax.div(jnp.maximum(q_first - window + 1 - kv_offset, zero), block_kv), hi)
    mid = jnp.clip(cdiv(jnp.maximum(q_last - window + 1 - kv_offset, zero), block_kv), start, hi)
    return start, mid, jnp.maximum(lo, mid), hi


def q_block_range(kv_first: jax.Array, kv_last: jax.Array, q_offset: jax.Array,
                  window: jax.Array | None, *, causal: bool, segmented: bool, block_q: int,
                  num_q_blocks: int) -> tuple[jax.Array, ...]:
    """(lo, full, near, end): query blocks [lo, full) need a mask, [full, near) see all of
    the keys kv_first..kv_last, [near, end) need a mask (the window's far edge); the
    rest see none of them. `window` is effective or None."""
    zero = jnp.int32(0)
    end = jnp.int32(num_q_blocks)
    if causal:
        lo = jnp.minimum(lax.div(jnp.maximum(kv_first - q_offset, zero), block_q), end)
        full = jnp.minimum(cdiv(jnp.maximum(kv_last - q_offset, zero), block_q), end)
    else:
        lo, full = zero, zero
    full = end if segmented else jnp.maximum(full, lo)
    if window is None:
        return lo, full, end, end
    # Rows up to kv_last + window - 1 see some key; rows up to kv_first + window - 1 see all.
    end = jnp.clip(cdiv(jnp.maximum(kv_last + window - q_offset, zero), block_q), lo, end)
    full = jnp.minimum(full, end)
    near = jnp.clip(lax.div(jnp.maximum(kv_first + window - q_offset, zero), block_q), full, end)
    return lo, full, near, end


def _split_refs(refs: tuple, segmented: bool, num_out: int) -> tuple:
    """(q_seg_ref, kv_seg_ref, *outputs), with None for absent segment ids."""
    if segmented:
        return refs
    return (None, None, *refs[-num_out:])


def _fwd_kernel(offsets_ref, q_ref, k_ref, v_ref, *refs, scale2: float, causal: bool,
                windowed: bool, segmented: bool, kv_len: int, block_q: int, block_kv: int,
                num_q_blocks: int, num_kv_blocks: int) -> None:
    q_seg_ref, kv_seg_ref, o_ref, lse_ref = _split_refs(refs, segmented, 2)
    i = num_q_blocks - 1 - pl.program_id(0)
    q_first = offsets_ref[0] + i * block_q
    kv_offset = offsets_ref[1]
    window = effective_window(offsets_ref[2]) if windowed else None
    q_pos = q_first + jnp.arange(block_q)
    q_seg = q_seg_ref[...] if segmented else None
    q = q_ref[...]
    start, mid, lo, hi = kv_block_range(q_first, q_first + block_q - 1, kv_offset, window,
                                        causal=causal, segmented=segmented, kv_len=kv_len,
                                        block_kv=block_kv, num_kv_blocks=num_kv_blocks)

    def step(j, carry, masked: bool):
        acc, m, denom = carry
        keys = pl.ds(j * block_kv, block_kv)
        s = dot(q, k_ref[keys, :], NT) * scale2
        if masked:
            mask = _mask(q_pos, q_seg, j, kv_offset, kv_seg_ref, window, causal=causal,
                         kv_len=kv_len, block_kv=block_kv)
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has seen nothing yet keeps m = -inf; shift it by 0 instead.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, denom * alpha + jnp.sum(p, axis=1)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    if windowed:
        carry = lax.fori_loop(start, mid, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(mid, lo, functools.partial(step, masked=False), carry)
    if causal or segmented or kv_len % block_kv:
        carry = lax.fori_loop(lo, hi, functools.partial(step, masked=True), carry)
    acc, m, denom = carry
    seen = denom > 0.0
    denom = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(denom)) / _LOG2E, -jnp.inf)


def _mask(q_pos: jax.Array, q_seg: jax.Array | None, j: jax.Array, kv_offset: jax.Array,
          kv_seg_ref, window: jax.Array | None, *, causal: bool, kv_len: int,
          block_kv: int) -> jax.Array:
    """Visibility [len(q_pos), block_kv] of key block j to the query rows, key padding
    included."""
    key = j * block_kv + jnp.arange(block_kv)
    kv_seg = kv_seg_ref[pl.ds(j * block_kv, block_kv)] if q_seg is not None else None
    mask = visible(q_pos[:, None], (kv_offset + key)[None, :],
                   None if q_seg is None else q_seg[:, None],
                   None if kv_seg is None else kv_seg[None, :], causal=causal, window=window)
    if kv_len % block_kv:
        real = (key < kv_len)[None, :]
        mask = real if mask is None else mask & real
    assert mask is not None, "called only for key blocks that mask something"
    return mask


def _dq_kernel(offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               scale: float, causal: bool, windowed: bool, segmented: bool, kv_len: int,
               block_q: int, block_kv: int, num_q_blocks: int, num_kv_blocks: int) -> None:
    q_seg_ref, kv_seg_ref, dq_ref = _split_refs(refs, segmented, 1)
    i = num_q_blocks - 1 - pl.program_id(0)
    q_first = offsets_ref[0] + i * block_q
    kv_offset = offsets_ref[1]
    q_pos = q_first + jnp.arange(block_q)
    q_seg = q_seg_ref[...] if segmented else None
    q, do = q_ref[...], do_ref[...]
    lse2 = lse_ref[...] * _LOG2E  # +inf for rows that see nothing: p = 0
    delta = delta_ref[...]
    scale2 = scale * _LOG2E
    window = effective_window(offsets_ref[2]) if windowed else None
    start, mid, lo, hi = kv_block_range(q_first, q_first + block_q - 1, kv_offset, window,
                                        causal=causal, segmented=segmented, kv_len=kv_len,
                                        block_kv=block_kv, num_kv_blocks=num_kv_blocks)

    def step(j, dq, masked: bool):
        keys = pl.ds(j * block_kv, block_kv)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = dot(q, k, NT) * scale2
        if masked:
            mask = _mask(q_pos, q_seg, j, kv_offset, kv_seg_ref, window, causal=causal,
                         kv_len=kv_len, block_kv=block_kv)
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - lse2[:, None])
        ds = p * (dot(do, v, NT) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    if windowed:
        dq = lax.fori_loop(start, mid, functools.partial(step, masked=True), dq)
    dq = lax.fori_loop(mid, lo, functools.partial(step, masked=False), dq)
    if causal or segmented or kv_len % block_kv:
        dq = lax.fori_loop(lo, hi, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                scale: float, causal: bool, windowed: bool, segmented: bool, groups: int,
                block_q: int, block_kv: int, num_q_blocks: int) -> None:
    q_seg_ref, kv_seg_ref, dk_ref, dv_ref = _split_refs(refs, segmented, 2)
    j = pl.program_id(0)
    q_offset = offsets_ref[0]
    kv_first = offsets_ref[1] + j * block_kv
    kv_pos = kv_first + jnp.arange(block_kv)
    kv_seg = kv_seg_ref[...] if segmented else None
    k, v = k_ref[...], v_ref[...]
    scale2 = scale * _LOG2E
    window = effective_window(offsets_ref[2]) if windowed else None
    lo, full, near, end = q_block_range(kv_first, kv_first + block_kv - 1, q_offset, window,
                                        causal=causal, segmented=segmented, block_q=block_q,
                                        num_q_blocks=num_q_blocks)

    def step(i, carry, g, masked: bool):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        s_t = dot(k, q, NT) * scale2  # [block_kv, block_q]
        if masked:
            q_pos = q_offset + i * block_q + jnp.arange(block_q)
            q_seg = q_seg_ref[rows] if segmented else None
            mask = visible(q_pos[None, :], kv_pos[:, None],
                           None if q_seg is None else q_seg[None, :],
                           None if kv_seg is None else kv_seg[:, None], causal=causal,
                           window=window)
            assert mask is not None, "a masked block masks something"
            s_t = jnp.where(mask, s_t, -jnp.inf)
        p_t = jnp.exp2(s_t - lse_ref[g, rows][None, :] * _LOG2E)
        dv = dv + dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot(v, do, NT) - delta_ref[g, rows][None, :])
        return dk + dot(ds_t.astype(q.dtype), q), dv

    def group(g, carry):
        if causal or segmented:
            carry = lax.fori_loop(lo, full, functools.partial(step, g=g, masked=True), carry)
        carry = lax.fori_loop(full, near, functools.partial(step, g=g, masked=False), carry)
        if windowed:
            carry = lax.fori_loop(near, end, functools.partial(step, g=g, masked=True), carry)
        return carry

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, group, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
            kv_seg: jax.Array | None, offsets: jax.Array, *, scale: float, causal: bool,
            windowed: bool, kv_len: int, block_q: int, block_kv: int, num_warps: int, num_stages: int,
            interpret: bool) -> tuple[jax.Array, jax.Array]:
    """out [B, T, H, D] and natural-log lse [B, H, T] (-inf for rows that see nothing)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    groups = h // kvh
    nq, nk = t // block_q, s // block_kv
    segmented = q_seg is not None

    def rev(i):
        return nq - 1 - i

    in_specs = [
        pl.BlockSpec((3,), lambda i, bi, hi: (0,)),
        pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // groups, 0)),
        pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // groups, 0)),
    ]
    args: list[Any] = [offsets, q, k, v]
    if segmented:
        in_specs += [pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, rev(i))),
                     pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))]
        args += [q_seg, kv_seg]
    kernel = functools.partial(
        _fwd_kernel, scale2=scale * _LOG2E, causal=causal, windowed=windowed, segmented=segmented,
        kv_len=kv_len, block_q=block_q, block_kv=block_kv, num_q_blocks=nq,
        num_kv_blocks=nk)
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, rev(i))),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_params(num_warps, num_stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
             kv_seg: jax.Array | None, offsets: jax.Array, do: jax.Array,
             lse: jax.Array, delta: jax.Array, *, scale: float, causal: bool, windowed: bool,
             kv_len: int, block_q_dq: int, block_kv_dq: int, block_q_dkv: int, block_kv_dkv: int,
             num_warps: int, num_stages: int,
             interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv. lse [B, H, T] must be +inf (not -inf) on rows that see nothing;
    delta [B, H, T] = rowsum(out * dout) - dlse (folds in the lse cotangent)."""
    args = (offsets, q, k, v, do, lse, delta)
    seg = (q_seg, kv_seg) if q_seg is not None else ()
    common: dict[str, Any] = dict(scale=scale, causal=causal, windowed=windowed,
                  params=_params(num_warps, num_stages), interpret=interpret)
    dq = _dq(args, seg, kv_len=kv_len, block_q=block_q_dq, block_kv=block_kv_dq, **common)
    dk, dv = _dkv(args, seg, block_q=block_q_dkv, block_kv=block_kv_dkv, **common)
    return dq, dk, dv


def _dq(args: tuple, seg: tuple, *, scale: float, causal: bool, windowed: bool, kv_len: int,
        block_q: int, block_kv: int, params: plgpu.CompilerParams, interpret: bool) -> jax.Array:
    q, k = args[1], args[2]
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    groups = h // kvh
    nq, nk = t // block_q, s // block_kv

    def rev(i):
        return nq - 1 - i

    q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // groups, 0))
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, rev(i)))
    in_specs = [pl.BlockSpec((3,), lambda i, bi, hi: (0,)), q_spec, kv_spec, kv_spec, q_spec,
                row_spec, row_spec]
    if seg:
        in_specs += [pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, rev(i))),
                     pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))]
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, windowed=windowed,
                          segmented=bool(seg),
                          kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                          num_q_blocks=nq, num_kv_blocks=nk),
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(*args, *seg)


def _dkv(args: tuple, seg: tuple, *, scale: float, causal: bool, windowed: bool, block_q: int,
         block_kv: int, params: plgpu.CompilerParams,
         interpret: bool) -> tuple[jax.Array, jax.Array]:
    q, k, v = args[1:4]
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    groups = h // kvh
    nq, nk = t // block_q, s // block_kv
    q_spec = pl.BlockSpec((None, t, groups, d), lambda j, bi, kh: (bi, 0, kh, 0))
    kv_spec = pl.BlockSpec((None, block_kv, None, d), lambda j, bi, kh: (bi, j, kh, 0))
    row_spec = pl.BlockSpec((None, groups, t), lambda j, bi, kh: (bi, kh, 0))
    in_specs = [pl.BlockSpec((3,), lambda j, bi, kh: (0,)), q_spec, kv_spec, kv_spec, q_spec,
                row_spec, row_spec]
    if seg:
        in_specs += [pl.BlockSpec((None, t), lambda j, bi, kh: (bi, 0)),
                     pl.BlockSpec((None, block_kv), lambda j, bi, kh: (bi, j))]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, windowed=windowed,
                          segmented=bool(seg),
                          groups=groups, block_q=block_q, block_kv=block_kv,
                          num_q_blocks=nq),
        grid=(nk, b, kvh),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*args, *seg)
