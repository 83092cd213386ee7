"""RMSNorm on TPUs: Pallas kernels compiled by Mosaic.

Owns the TPU forward and backward kernels. Shaped the TPU way: one grid axis over
blocks of `block_rows` rows, each block [block_rows, hidden] taken whole (Mosaic
pipelines the block copies from HBM; no in-kernel loop), the axis 'parallel' so that
megacore chips split it. Blocks hold about 256k elements (1 MiB per fp32 temporary,
well inside VMEM), and at least 32 rows: a multiple of the sublane tiling of every
float dtype, or all the rows when there are fewer.
- hidden is padded with zeros to a multiple of 128 (the lane width) when it is not one
  already (model widths are): zero columns add nothing to the sums, whose mean divides
  by the true hidden, and are sliced off;
- inv_rms and the other row statistics are [rows, 1] columns, so they broadcast over a
  block without in-kernel transposes;
- the backward writes the block's partial sum of dy * xhat as one fp32 row, which the
  caller sums; the rows past the end of the last block (unspecified on read) are
  excluded from it with a select, not a product, since they may hold NaN.
Kept simple (no tuning), as this kernel is only lowered and interpreted here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kernel_math import cdiv_int

LANES = 128
BLOCK_ELEMENTS = 1 << 18
MIN_ROWS = 32  # sublane tiling: 8 rows of 32-bit, 16 of 16-bit, 32 of 8-bit values


def default_block_rows(hidden: int) -> int:
    """A power of two in [MIN_ROWS, 1024], about BLOCK_ELEMENTS elements per block."""
    hidden_p = cdiv_int(hidden, LANES) * LANES
    return min(1024, max(MIN_ROWS, 1 << (max(BLOCK_ELEMENTS // hidden_p, 1).bit_length() - 1)))


def _block_rows(rows: int, hidden: int, block_rows: int | None) -> int:
    block_rows = block_rows or default_block_rows(hidden)
    if block_rows >= rows:
        return rows  # one block: its shape equals the array's, which Mosaic always takes
    if block_rows % MIN_ROWS:
        raise ValueError(f"block_rows: {block_rows} must be a multiple of {MIN_ROWS} on TPU "
                         f"(or at least the row count, {rows})")
    return block_rows


def _pad_hidden(a: jax.Array) -> jax.Array:
    pad = -a.shape[-1] % LANES
    return a if not pad else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])


def _fwd_kernel(x_ref, w_ref, y_ref, inv_ref, *, eps: float, hidden: int) -> None:
    x = x_ref[...].astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / hidden + eps)
    y_ref[...] = (x * inv * w_ref[...].astype(jnp.float32)).astype(y_ref.dtype)
    inv_ref[...] = inv


def _bwd_kernel(x_ref, w_ref, inv_ref, dy_ref, dx_ref, dw_ref, *, rows: int,
                hidden: int) -> None:
    block_rows = x_ref.shape[0]
    x, dy = x_ref[...].astype(jnp.float32), dy_ref[...].astype(jnp.float32)
    inv = inv_ref[...]
    xhat = x * inv
    g = dy * w_ref[...].astype(jnp.float32)
    mean_gx = jnp.sum(g * xhat, axis=1, keepdims=True) / hidden
    dx_ref[...] = (inv * (g - xhat * mean_gx)).astype(dx_ref.dtype)
    contribution = dy * xhat
    if rows % block_rows:
        row = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, x.shape, 0)
        contribution = jnp.where(row < rows, contribution, 0.0)
    dw_ref[...] = jnp.sum(contribution, axis=0, keepdims=True)


def _call(kernel, args: tuple, *, block_rows: int, out_shape: list, out_specs: list,
          in_specs: list, interpret: bool, name: str):
    rows = args[0].shape[0]
    return pl.pallas_call(
        kernel,
        grid=(cdiv_int(rows, block_rows),),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name=name,
    )(*args)


def forward(x: jax.Array, scale: jax.Array, *, eps: float, out_dtype: jnp.dtype,
            block_rows: int | None, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """y [rows, hidden] in out_dtype and inv_rms [rows] fp32, of x [rows, hidden]."""
    rows, hidden = x.shape
    block_rows = _block_rows(rows, hidden, block_rows)
    xp, wp = _pad_hidden(x), _pad_hidden(scale[None, :])
    hidden_p = xp.shape[1]
    row_spec = pl.BlockSpec((block_rows, hidden_p), lambda i: (i, 0))
    y, inv = _call(
        functools.partial(_fwd_kernel, eps=eps, hidden=hidden), (xp, wp),
        block_rows=block_rows,
        in_specs=[row_spec, pl.BlockSpec((1, hidden_p), lambda i: (0, 0))],
        out_specs=[row_spec, pl.BlockSpec((block_rows, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, hidden_p), out_dtype),
                   jax.ShapeDtypeStruct((rows, 1), jnp.float32)],
        interpret=interpret,
        name="rms_norm_fwd_tpu",
    )
    return y[:, :hidden], inv[:, 0]


def backward(x: jax.Array, scale: jax.Array, inv_rms: jax.Array, dy: jax.Array, *,
             block_rows: int | None, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """dx [rows, hidden] in x's dtype, and dscale partials [blocks, hidden] fp32 (their
    sum over blocks is dscale)."""
    rows, hidden = x.shape
    block_rows = _block_rows(rows, hidden, block_rows)
    xp, wp, dyp = _pad_hidden(x), _pad_hidden(scale[None, :]), _pad_hidden(dy)
    hidden_p = xp.shape[1]
    blocks = cdiv_int(rows, block_rows)
    row_spec = pl.BlockSpec((block_rows, hidden_p), lambda i: (i, 0))
    dx, dw = _call(
        functools.partial(_bwd_kernel, rows=rows, hidden=hidden),
        (xp, wp, inv_rms[:, None], dyp),
        block_rows=block_rows,
        in_specs=[row_spec, pl.BlockSpec((1, hidden_p), lambda i: (0, 0)),
                  pl.BlockSpec((block_rows, 1), lambda i: (i, 0)), row_spec],
        out_specs=[row_spec, pl.BlockSpec((None, 1, hidden_p), lambda i: (i, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, hidden_p), x.dtype),
                   jax.ShapeDtypeStruct((blocks, 1, hidden_p), jnp.float32)],
        interpret=interpret,
        name="rms_norm_bwd_tpu",
    )
    return dx[:, :hidden], dw[:, 0, :hidden]
