"""Pieces every kernel body uses: dot dimension numbers, an fp32-accumulating dot, ceil division.

One home so the flash attention, RMSNorm and grouped matmul kernels (Triton and Mosaic)
write a matmul and a block count the same way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot(a: jax.Array, b: jax.Array, dims=NN) -> jax.Array:
    """a times b contracted as `dims`, accumulated and returned in fp32."""
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def cdiv(x: jax.Array, block: int) -> jax.Array:
    """ceil(x / block) of a traced x >= 0 (lax.div truncates, which is floor there)."""
    return lax.div(x + (block - 1), block)


def cdiv_int(a: int, b: int) -> int:
    """ceil(a / b) of Python ints >= 0."""
    return -(-a // b)
