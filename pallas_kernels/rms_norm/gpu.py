"""RMSNorm on NVIDIA GPUs: Pallas kernels compiled by Triton.

Owns the GPU forward and backward kernels and their launch parameters. Both are one
grid axis over blocks of `block_rows` rows; a program walks its block a tile of rows at
a time (a tile is about 4096 elements, held in registers in fp32), and every tile spans
the whole hidden dimension, so the row statistics need no cross-program reduction:
- forward: one tile per program by default (many small programs stream at memory
  bandwidth); writes y and inv_rms [rows] fp32, the backward's residual;
- backward: dx per row in one pass, dx = inv * (g - xhat * mean(g * xhat)) with
  g = dy * scale and xhat = x * inv, and the block's partial sum of dy * xhat, one
  fp32 row per program, which the caller sums. Blocks are sized so that there are
  about 512 programs: few enough that the partials stay a few percent of the traffic.
Triton tensors have power-of-two sizes: the hidden block is rounded up to one and the
columns beyond `hidden` are masked (loaded as 0, not stored), as are the rows past the
end of the last block. Nothing is padded in memory, so no extra copy is made.
`pallas_call` gets Triton compiler params explicitly: without them it may select
Mosaic GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kernel_math import cdiv_int

TILE_ELEMENTS = 4096  # elements of one tile of rows (fp32 in registers)
BACKWARD_PROGRAMS = 512  # the backward's default block count (one dscale partial each)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def default_block_rows(rows: int, hidden: int, *, backward: bool) -> int:
    """Rows per program: one tile forward; backward about BACKWARD_PROGRAMS blocks."""
    tile = max(1, TILE_ELEMENTS // _pow2(hidden))
    wanted = max(tile, _pow2(cdiv_int(rows, BACKWARD_PROGRAMS))) if backward else tile
    return min(wanted, _pow2(rows))


def _params(tile_elements: int) -> plgpu.CompilerParams:
    num_warps = 16 if tile_elements >= 8192 else 8 if tile_elements >= 2048 else 4
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _masks(first_row: jax.Array, tile: int, rows: int, hidden: int, hidden_pad: int,
           mask_rows: bool) -> tuple[jax.Array | None, jax.Array | None]:
    """(tile mask [tile, hidden_pad], row mask [tile]) of the tile starting at
    first_row; None where nothing is out of bounds."""
    row_ok = (first_row + jnp.arange(tile) < rows) if mask_rows else None
    col_ok = (jnp.arange(hidden_pad) < hidden) if hidden_pad != hidden else None
    if row_ok is None and col_ok is None:
        return None, None
    if col_ok is None:
        assert row_ok is not None
        return jnp.broadcast_to(row_ok[:, None], (tile, hidden_pad)), row_ok
    if row_ok is None:
        return jnp.broadcast_to(col_ok[None, :], (tile, hidden_pad)), None
    return row_ok[:, None] & col_ok[None, :], row_ok


def _load(ref, mask: jax.Array | None) -> jax.Array:
    """The ref as fp32, out-of-bounds elements 0."""
    value = plgpu.load(ref, mask=mask, other=None if mask is None else 0)
    return value.astype(jnp.float32)


def _load_scale(w_ref, hidden: int) -> jax.Array:
    hidden_pad = w_ref.shape[0]
    return _load(w_ref, jnp.arange(hidden_pad) < hidden if hidden_pad != hidden else None)


def _fwd_kernel(x_ref, w_ref, y_ref, inv_ref, *, eps: float, rows: int, hidden: int,
                tile: int, mask_rows: bool) -> None:
    block_rows, hidden_pad = x_ref.shape
    first = pl.program_id(0) * block_rows
    w = _load_scale(w_ref, hidden)

    def step(t, carry):
        mask, row_mask = _masks(first + t * tile, tile, rows, hidden, hidden_pad, mask_rows)
        r = pl.ds(t * tile, tile)
        x = _load(x_ref.at[r, :], mask)
        inv = lax.rsqrt(jnp.sum(x * x, axis=1) / hidden + eps)
        plgpu.store(y_ref.at[r, :], (x * inv[:, None] * w[None, :]).astype(y_ref.dtype),
                    mask=mask)
        plgpu.store(inv_ref.at[r], inv, mask=row_mask)
        return carry

    lax.fori_loop(0, block_rows // tile, step, 0)


def _bwd_kernel(x_ref, w_ref, inv_ref, dy_ref, dx_ref, dw_ref, *, rows: int, hidden: int,
                tile: int, mask_rows: bool) -> None:
    block_rows, hidden_pad = x_ref.shape
    first = pl.program_id(0) * block_rows
    w = _load_scale(w_ref, hidden)

    def step(t, dw):
        mask, row_mask = _masks(first + t * tile, tile, rows, hidden, hidden_pad, mask_rows)
        r = pl.ds(t * tile, tile)
        x, dy = _load(x_ref.at[r, :], mask), _load(dy_ref.at[r, :], mask)
        inv = _load(inv_ref.at[r], row_mask)[:, None]
        xhat = x * inv
        g = dy * w[None, :]
        mean_gx = jnp.sum(g * xhat, axis=1, keepdims=True) / hidden
        plgpu.store(dx_ref.at[r, :], (inv * (g - xhat * mean_gx)).astype(dx_ref.dtype),
                    mask=mask)
        return dw + jnp.sum(dy * xhat, axis=0)  # masked rows and columns add 0

    dw = lax.fori_loop(0, block_rows // tile, step, jnp.zeros((hidden_pad,), jnp.float32))
    plgpu.store(dw_ref, dw, mask=jnp.arange(hidden_pad) < hidden if hidden_pad != hidden
                else None)


def _layout(rows: int, hidden: int, block_rows: int) -> tuple[int, int, bool]:
    """(hidden_pad, tile, mask_rows) for a launch with these blocks."""
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows: {block_rows} must be a power of two for the Triton "
                         f"kernels")
    hidden_pad = _pow2(hidden)
    tile = min(block_rows, max(1, TILE_ELEMENTS // hidden_pad))
    return hidden_pad, tile, rows % block_rows != 0


def forward(x: jax.Array, scale: jax.Array, *, eps: float, out_dtype: jnp.dtype,
            block_rows: int | None, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """y [rows, hidden] in out_dtype and inv_rms [rows] fp32, of x [rows, hidden]."""
    rows, hidden = x.shape
    block_rows = block_rows or default_block_rows(rows, hidden, backward=False)
    hidden_pad, tile, mask_rows = _layout(rows, hidden, block_rows)
    row_spec = pl.BlockSpec((block_rows, hidden_pad), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps, rows=rows, hidden=hidden, tile=tile,
                          mask_rows=mask_rows),
        grid=(cdiv_int(rows, block_rows),),
        in_specs=[row_spec, pl.BlockSpec((hidden_pad,), lambda i: (0,))],
        out_specs=[row_spec, pl.BlockSpec((block_rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((rows, hidden), out_dtype),
                   jax.ShapeDtypeStruct((rows,), jnp.float32)],
        compiler_params=_params(tile * hidden_pad),
        interpret=interpret,
        name="rms_norm_fwd",
    )(x, scale)


def backward(x: jax.Array, scale: jax.Array, inv_rms: jax.Array, dy: jax.Array, *,
             block_rows: int | None, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """dx [rows, hidden] in x's dtype, and dscale partials [blocks, hidden] fp32 (their
    sum over blocks is dscale)."""
    rows, hidden = x.shape
    block_rows = block_rows or default_block_rows(rows, hidden, backward=True)
    hidden_pad, tile, mask_rows = _layout(rows, hidden, block_rows)
    blocks = cdiv_int(rows, block_rows)
    row_spec = pl.BlockSpec((block_rows, hidden_pad), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, rows=rows, hidden=hidden, tile=tile,
                          mask_rows=mask_rows),
        grid=(blocks,),
        in_specs=[row_spec, pl.BlockSpec((hidden_pad,), lambda i: (0,)),
                  pl.BlockSpec((block_rows,), lambda i: (i,)), row_spec],
        out_specs=[row_spec, pl.BlockSpec((None, hidden_pad), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, hidden), x.dtype),
                   jax.ShapeDtypeStruct((blocks, hidden), jnp.float32)],
        compiler_params=_params(tile * hidden_pad),
        interpret=interpret,
        name="rms_norm_bwd",
    )(x, scale, inv_rms, dy)
