"""FP8 matmuls for the decoder's projections (`model.matmul_precision = 'fp8'`).

`matmul(x, w, n_in, out_dtype)` computes what `Linear` computes, x[..., *in] @ w[*in, *out],
as FP8 GEMMs: the forward multiplies E4M3 operands, the backward multiplies the E5M2
output gradient with the E4M3 operands saved by the forward. Each GEMM is one
`jax.lax.dot_general` whose operands are float8 arrays with `preferred_element_type`,
so XLA on H100/H200 emits cuBLASLt FP8 GEMMs (`__cublas$lt$matmul$f8`), and on a CPU
the same program runs (XLA upcasts the operands) with the same rounding.

Decisions:
- Per-tensor *current* scaling: each operand's scale is its own amax / the format's
  largest finite value, computed in the step. It is stateless (nothing in the train
  state, the checkpoint or the optimizer changes), cannot overflow on a spike, and the
  extra amax read is memory-bound work that XLA fuses into the producer. Delayed
  scaling (an amax history in the train state) saves that read but overflows when an
  amax grows faster than its history, and it would add state to every checkpoint.
  Torchtitan's Float8 default makes the same choice ("tensorwise dynamic").
- Scales are plain fp32 multipliers (x ~= q * scale), not rounded to powers of two:
  the GEMM applies them once per output element, so any value costs the same.
- The residuals of the backward are the FP8 operands and their scales, so the
  activations a linear layer keeps for its backward are stored in one byte per element
  (COAT's FP8 activations, for the linear inputs).
- Master weights are untouched: `w` arrives in its stored dtype (fp32), is quantized
  from there, and its gradient returns in that dtype.
- Leading dims are flattened into one M and the contracted/output dims into K and N, so
  every GEMM is a plain [M, K] x [K, N] (or its transposes): the layout cuBLASLt takes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn  # activations and weights: more mantissa
GRADIENT_DTYPE = jnp.float8_e5m2  # output gradients: more range


def quantize(x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """(codes, scale) with x ~= codes * scale; scale = amax(|x|) / max(dtype), 1 for an all-zero x."""
    largest = float(jnp.finfo(dtype).max)
    amax = jax.lax.stop_gradient(jnp.max(jnp.abs(x)).astype(jnp.float32))
    scale = jnp.where(amax > 0, amax / largest, 1.0)
    codes = jnp.clip(x.astype(jnp.float32) / scale, -largest, largest).astype(dtype)
    return codes, scale


def _gemm(a: jax.Array, b: jax.Array, contract: tuple[int, int], scale: jax.Array,
          out_dtype: jnp.dtype) -> jax.Array:
    """One FP8 GEMM of 2-D operands, contracting a's dim contract[0] with b's contract[1], rescaled.

    dot(f8, f8) -> f32 times a broadcast scalar is the shape XLA's GPU GEMM rewriter folds
    into one `__cublas$lt$matmul$f8` call, the scale passed as its operand."""
    product = jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return (product * scale).astype(out_dtype)


def matmul(x: jax.Array, w: jax.Array, n_in: int, out_dtype: jnp.dtype) -> jax.Array:
    """x[..., *in] @ w[*in, *out] (in = w's first n_in dims) as FP8 GEMMs, returned in out_dtype;
    the gradients return in x's and w's dtypes."""
    k, out_shape = math.prod(w.shape[:n_in]), w.shape[n_in:]
    y = _matmul_2d(x.reshape(-1, k), w.reshape(k, -1), jnp.dtype(out_dtype), x.dtype, w.dtype)
    return y.reshape(*x.shape[:x.ndim - n_in], *out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul_2d(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype, x_dtype: jnp.dtype,
               w_dtype: jnp.dtype) -> jax.Array:
    return _forward(x, w, out_dtype, x_dtype, w_dtype)[0]


def _forward(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype, x_dtype: jnp.dtype,
             w_dtype: jnp.dtype) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    qx, sx = quantize(x, FORWARD_DTYPE)
    qw, sw = quantize(w, FORWARD_DTYPE)
    return _gemm(qx, qw, (1, 0), sx * sw, out_dtype), (qx, sx, qw, sw)


def _backward(out_dtype: jnp.dtype, x_dtype: jnp.dtype, w_dtype: jnp.dtype, residuals: tuple[jax.Array, ...],
              grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    qx, sx, qw, sw = residuals
    qg, sg = quantize(grad, GRADIENT_DTYPE)
    dx = _gemm(qg, qw, (1, 1), sg * sw, x_dtype)  # [M, N] x [K, N] -> [M, K]
    dw = _gemm(qx, qg, (0, 0), sx * sg, w_dtype)  # [M, K] x [M, N] -> [K, N]
    return dx, dw


_matmul_2d.defvjp(_forward, _backward)
