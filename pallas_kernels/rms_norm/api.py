"""`rms_norm`: the one entry point, with backend selection, row flattening and the VJP.

Owns what every kernel backend shares, so that gpu.py and tpu.py hold only kernels and
their launch: argument checks, picking the backend, flattening the leading dimensions
into rows, and the `jax.custom_vjp` that joins a backend's forward and backward kernels.
The forward saves inv_rms [rows] fp32 as a residual (4 bytes a row, against two reads
of the row to recompute it), so the backward reads x, scale, inv_rms and dy once each.
dscale arrives as per-block fp32 partial sums and is summed here, then cast to scale's
dtype. A raw `pallas_call` cannot be differentiated, hence the custom_vjp around the
kernels; the 'xla' backend is the plain reference and is differentiated by ordinary
autodiff.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.backends import resolve_backend
from pallas_kernels.rms_norm import gpu, reference, tpu


def rms_norm(
    x: jax.Array,
    scale: jax.Array,
    *,
    eps: float = 1e-5,
    out_dtype: jnp.dtype | None = None,
    backend: str = "auto",
    interpret: bool = False,
    block_rows: int | None = None,
) -> jax.Array:
    """y = x / sqrt(mean(x^2, -1) + eps) * scale, differentiable in x and scale.

    x [..., hidden] of any float dtype, scale [hidden]. Statistics and products are
    computed in float32 (x * inv_rms * scale, as the model's RMSNorm does) and y is cast
    once to `out_dtype` (default x's dtype). Gradients come back in x's and scale's dtypes.

    backend: 'triton' (NVIDIA GPU), 'mosaic_tpu' (TPU), 'xla' (plain JAX reference),
    'auto' (triton on an NVIDIA GPU, mosaic_tpu on a TPU, xla otherwise). interpret=True
    runs the Pallas kernel (Triton's unless backend is 'mosaic_tpu') in the Pallas
    interpreter on any platform; it never falls back to xla. block_rows: rows per kernel
    program (grid step), in both passes; None picks per backend (gpu.default_block_rows,
    tpu.default_block_rows). Triton needs a power of two, TPU a multiple of 32.
    """
    if x.ndim < 1 or scale.shape != x.shape[-1:]:
        raise ValueError(f"scale must be [hidden] matching x [..., hidden], got {scale.shape} "
                         f"and {x.shape}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(scale.dtype, jnp.floating)):
        raise ValueError(f"x and scale must be floating point, got {x.dtype} and {scale.dtype}")
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer or None, got {block_rows!r}")
    backend = resolve_backend(backend, interpret)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if x.size == 0:  # no rows (or no columns): nothing for a kernel to do
        return x.astype(out_dtype)
    if backend == "xla":
        return _reference(x, scale, eps=float(eps), out_dtype=out_dtype)
    static = _Static(backend, float(eps), out_dtype, block_rows, interpret)
    return _pallas(x, scale, static=static)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype"))
def _reference(x, scale, *, eps: float, out_dtype: jnp.dtype):
    return reference.rms_norm_reference(x, scale, eps=eps, out_dtype=out_dtype)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one kernel call (the custom_vjp's non-diff argument)."""
    backend: str
    eps: float
    out_dtype: jnp.dtype
    block_rows: int | None
    interpret: bool


@functools.partial(jax.jit, static_argnames=("static",))
def _pallas(x, scale, *, static: _Static):
    rows = math.prod(x.shape[:-1])
    y = _norm(static, x.reshape(rows, x.shape[-1]), scale)
    return y.reshape(x.shape)


def _kernels(static: _Static):
    return tpu if static.backend == "mosaic_tpu" else gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _norm(static: _Static, x, scale):
    return _forward(static, x, scale)[0]


def _forward(static: _Static, x, scale):
    return _kernels(static).forward(x, scale, eps=static.eps, out_dtype=static.out_dtype,
                                    block_rows=static.block_rows, interpret=static.interpret)


def _norm_fwd(static: _Static, x, scale):
    y, inv_rms = _forward(static, x, scale)
    return y, (x, scale, inv_rms)


def _norm_bwd(static: _Static, residuals, dy):
    x, scale, inv_rms = residuals
    dx, dscale = _kernels(static).backward(x, scale, inv_rms, dy, block_rows=static.block_rows,
                                           interpret=static.interpret)
    return dx, jnp.sum(dscale, axis=0).astype(scale.dtype)


_norm.defvjp(_norm_fwd, _norm_bwd)
