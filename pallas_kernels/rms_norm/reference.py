"""Plain-JAX RMSNorm: the semantics every rms_norm backend must reproduce.

Owns `rms_norm_reference`, the 'xla' backend and the oracle of the tests. It is the
model's `RMSNorm` written as a function: statistics and products in float32 (float64
when the inputs are, for the tests' oracle), `x * inv_rms * scale` in that order, then
one cast to the output dtype. It is differentiated by ordinary autodiff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(x: jax.Array, scale: jax.Array, *, eps: float,
                       out_dtype: jnp.dtype | None = None) -> jax.Array:
    """y = x / sqrt(mean(x^2, -1) + eps) * scale, in `out_dtype` (default x's dtype)."""
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, scale.dtype), jnp.float32)
    x32 = x.astype(dtype)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * inv_rms * scale.astype(dtype)).astype(out_dtype or x.dtype)
