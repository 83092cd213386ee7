"""`grouped_matmul`: rows sorted by group, each group's rows times that group's weight.

out[r] = rows[r] @ weights[g] for the rows of group g (group g holds group_sizes[g]
consecutive rows, in group order); rows past sum(group_sizes) give 0. The semantics of
`jax.lax.ragged_dot`, which is the 'xla' backend; 'triton' runs the Pallas kernels of
gpu.py with a custom VJP (rows' gradient: the same kernel against the transposed weights;
weights' gradient: a per-group rows.T @ dy kernel). 'auto' is 'xla' everywhere for now:
on a TPU ragged_dot is native, and on NVIDIA GPUs the kernel is chosen by `moe.impl=pallas`
until a measurement makes it the default (benchmarks: scripts/bench_gpu.sh section 8).
There is no Mosaic TPU kernel; asking for one is refused.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backends import resolve_backend
from pallas_kernels.grouped_matmul import gpu

MIN_BLOCK = 16  # Triton's smallest dot tile


@dataclasses.dataclass(frozen=True)
class GroupedBlocks:
    """Tile sizes (powers of two): rows per tile, and the largest column / contraction tiles;
    a dimension takes the largest power of two up to its bound that divides it."""

    block_m: int = 64
    block_k: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_k", "block_n"):
            n = getattr(self, name)
            if n < MIN_BLOCK or n & (n - 1):
                raise ValueError(f"GroupedBlocks.{name} must be a power of two >= {MIN_BLOCK}, got {n}")


def fit_block(dim: int, bound: int, name: str) -> int:
    """The largest power of two <= bound dividing `dim`; at least MIN_BLOCK, else a ValueError naming `name`."""
    block = bound
    while block >= MIN_BLOCK and dim % block:
        block //= 2
    if block < MIN_BLOCK:
        raise ValueError(f"{name}: {dim} must be a multiple of {MIN_BLOCK} for the Pallas grouped matmul")
    return block


def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
                   interpret: bool = False, blocks: GroupedBlocks | None = None) -> jax.Array:
    """rows [M, K] sorted by group, weights [G, K, N], group_sizes [G] (int) -> [M, N] in the rows'
    dtype; differentiable in rows and weights. backend: 'auto' | 'xla' | 'triton'; interpret=True
    runs the Triton kernel in the Pallas interpreter (any platform), never the 'xla' path."""
    if rows.ndim != 2 or weights.ndim != 3 or rows.shape[1] != weights.shape[1]:
        raise ValueError(f"rows must be [M, K] and weights [G, K, N] with the same K, got {rows.shape} "
                         f"and {weights.shape}")
    if group_sizes.shape != (weights.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be int [G] = [{weights.shape[0]}], got {group_sizes.dtype} "
                         f"{group_sizes.shape}")
    if backend == "auto" and not interpret:  # ragged_dot on every platform until a GPU measurement
        return jax.lax.ragged_dot(rows, weights, group_sizes)
    resolved = resolve_backend(backend, interpret)
    if resolved == "mosaic_tpu":
        raise ValueError("backend: 'mosaic_tpu' has no grouped matmul kernel; use 'xla' (ragged_dot, native on TPUs)")
    if resolved == "xla":
        return jax.lax.ragged_dot(rows, weights, group_sizes)
    if rows.dtype != weights.dtype:
        raise ValueError(f"rows and weights must share a dtype for the Pallas kernel, got {rows.dtype} and "
                         f"{weights.dtype}")
    chosen = blocks or GroupedBlocks()
    k, n = weights.shape[1:]
    tiles = _Tiles(block_m=chosen.block_m, block_k=fit_block(k, chosen.block_k, "K (rows' and weights' inner size)"),
                   block_n=fit_block(n, chosen.block_n, "N (weights' output size)"), num_warps=chosen.num_warps,
                   num_stages=chosen.num_stages, interpret=interpret)
    return _pallas(rows, weights, group_sizes.astype(jnp.int32), tiles)


@dataclasses.dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_k: int  # divides weights' K
    block_n: int  # divides weights' N
    num_warps: int
    num_stages: int
    interpret: bool

    def launch(self) -> dict:
        return dict(block_m=self.block_m, num_warps=self.num_warps, num_stages=self.num_stages,
                    interpret=self.interpret)


def _bounds(group_sizes: jax.Array, rows: int, padded_rows: int) -> tuple[jax.Array, jax.Array]:
    """Each group's [start, end) rows, clipped to the rows there are, padded to a power-of-two
    length with empty groups past every row (Triton loads power-of-two vectors)."""
    cumulative = jnp.cumsum(group_sizes)
    starts, ends = jnp.minimum(cumulative - group_sizes, rows), jnp.minimum(cumulative, rows)
    groups = group_sizes.shape[0]
    length = 1 << max(groups - 1, 0).bit_length()
    pad = jnp.full((length - groups,), padded_rows, jnp.int32)
    return jnp.concatenate([starts, pad]), jnp.concatenate([ends, pad])


def _pad_rows(x: jax.Array, block_m: int) -> jax.Array:
    return jnp.pad(x, ((0, -x.shape[0] % block_m), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, tiles: _Tiles) -> jax.Array:
    return _forward(rows, weights, group_sizes, tiles)[0]


def _forward(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, tiles: _Tiles) -> tuple:
    m = rows.shape[0]
    x = _pad_rows(rows, tiles.block_m)
    starts, ends = _bounds(group_sizes, m, x.shape[0])
    out = gpu.gmm(starts, ends, x, weights, transpose_w=False, block_k=tiles.block_k, block_n=tiles.block_n,
                  out_dtype=rows.dtype, **tiles.launch())
    return out[:m], (x, weights, starts, ends)


def _backward(tiles: _Tiles, residuals: tuple, dy: jax.Array) -> tuple:
    x, weights, starts, ends = residuals
    m = dy.shape[0]
    dy_padded = _pad_rows(dy.astype(x.dtype), tiles.block_m)
    # Rows' gradient: contract over N (the forward's output tile), produce K (its contraction tile).
    dx = gpu.gmm(starts, ends, dy_padded, weights, transpose_w=True, block_k=tiles.block_n, block_n=tiles.block_k,
                 out_dtype=x.dtype, **tiles.launch())
    dw = gpu.tgmm(starts, ends, x, dy_padded, groups=weights.shape[0], block_k=tiles.block_k, block_n=tiles.block_n,
                  out_dtype=weights.dtype, **tiles.launch())
    return dx[:m], dw, None


_pallas.defvjp(_forward, _backward)
