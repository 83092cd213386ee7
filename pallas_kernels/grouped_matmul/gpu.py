"""Grouped matmul on NVIDIA GPUs: Pallas kernels compiled by Triton.

Owns the two kernels a Mixture-of-Experts layer needs, forward and backward:
- `gmm`: out[r] = rows[r] @ w[g(r)] for rows sorted by group (and, with `transpose_w`,
  rows[r] @ w[g(r)].T: the rows' gradient). Grid (row tiles, output column tiles). A row
  tile may straddle group boundaries, so each program loops over the groups that meet
  its rows (found from the group bounds in the kernel) and keeps each group's result on
  that group's rows only; a tile inside one group costs one matmul, a tile on a boundary
  one per group it meets. Rows past the last group are 0.
- `tgmm`: dw[g] = rows_g.T @ dy_g (the weights' gradient). Grid (groups, K tiles, N
  tiles); each program walks the row tiles of its group, rows of other groups masked.
Shaped so because the alternative XLA offers on GPUs expands the grouped matmul densely
over the groups (G times the FLOPs and a [G, rows, K] buffer), which is what makes a
128-expert layer unaffordable. Inputs arrive from api.py with rows padded to a multiple
of the row tile and group bounds padded to a power of two (Triton's vector lengths).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kernel_math import NT, TN, cdiv, dot


def _gmm_kernel(starts_ref, ends_ref, x_ref, w_ref, o_ref, *, block_m: int, block_k: int, num_k: int,
                transpose_w: bool) -> None:
    first_row = pl.program_id(0) * block_m
    col = pl.program_id(1)
    block_n = o_ref.shape[1]
    rows = first_row + jnp.arange(block_m)
    # Bounds are sorted, so the groups meeting rows [first_row, first_row + block_m) are a run.
    g_first = jnp.sum((ends_ref[...] <= first_row).astype(jnp.int32))
    g_stop = jnp.sum((starts_ref[...] < first_row + block_m).astype(jnp.int32))

    def one_group(g, out):
        start, end = starts_ref[g], ends_ref[g]

        def k_step(kk, acc):
            x = x_ref[:, pl.ds(kk * block_k, block_k)]
            if transpose_w:  # w [G, N_out, K_in]: rows @ w[g].T
                return acc + dot(x, w_ref[g, pl.ds(col * block_n, block_n), pl.ds(kk * block_k, block_k)], NT)
            return acc + dot(x, w_ref[g, pl.ds(kk * block_k, block_k), pl.ds(col * block_n, block_n)])

        steps = jnp.where(end > start, num_k, 0)  # an empty group costs nothing
        acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_m, block_n), jnp.float32))
        inside = (rows >= start) & (rows < end)
        return jnp.where(inside[:, None], acc, out)

    out = lax.fori_loop(g_first, g_stop, one_group, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = out.astype(o_ref.dtype)


def gmm(starts: jax.Array, ends: jax.Array, x: jax.Array, w: jax.Array, *, transpose_w: bool, block_m: int,
        block_k: int, block_n: int, out_dtype: jnp.dtype, num_warps: int, num_stages: int,
        interpret: bool) -> jax.Array:
    """x [M, K] (M a multiple of block_m) times w [G, K, N] (or w [G, N, K] with transpose_w) -> [M, N]."""
    m, k = x.shape
    n = w.shape[1] if transpose_w else w.shape[2]
    bounds = pl.BlockSpec((starts.shape[0],), lambda i, j: (0,))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, block_m=block_m, block_k=block_k, num_k=k // block_k,
                          transpose_w=transpose_w),
        grid=(m // block_m, n // block_n),
        in_specs=[bounds, bounds, pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
                  pl.BlockSpec(w.shape, lambda i, j: (0, 0, 0))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul_transposed" if transpose_w else "grouped_matmul",
    )(starts, ends, x, w)


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, dw_ref, *, block_m: int) -> None:
    g = pl.program_id(0)
    start, end = starts_ref[g], ends_ref[g]
    block_k, block_n = dw_ref.shape

    def step(t, acc):
        first_row = t * block_m
        rows = first_row + jnp.arange(block_m)
        inside = (rows >= start) & (rows < end)
        x = jnp.where(inside[:, None], x_ref[pl.ds(first_row, block_m), :], 0)
        return acc + dot(x, dy_ref[pl.ds(first_row, block_m), :], TN)

    acc = lax.fori_loop(lax.div(start, block_m), cdiv(end, block_m), step,
                        jnp.zeros((block_k, block_n), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def tgmm(starts: jax.Array, ends: jax.Array, x: jax.Array, dy: jax.Array, *, groups: int, block_m: int,
         block_k: int, block_n: int, out_dtype: jnp.dtype, num_warps: int, num_stages: int,
         interpret: bool) -> jax.Array:
    """dw [G, K, N] with dw[g] = x_g.T @ dy_g; x [M, K], dy [M, N], M a multiple of block_m."""
    m, k = x.shape
    n = dy.shape[1]
    bounds = pl.BlockSpec((starts.shape[0],), lambda g, i, j: (0,))
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=block_m),
        grid=(groups, k // block_k, n // block_n),
        in_specs=[bounds, bounds, pl.BlockSpec((m, block_k), lambda g, i, j: (0, i)),
                  pl.BlockSpec((m, block_n), lambda g, i, j: (0, j))],
        out_specs=pl.BlockSpec((None, block_k, block_n), lambda g, i, j: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((groups, k, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul_weight_grad",
    )(starts, ends, x, dy)
