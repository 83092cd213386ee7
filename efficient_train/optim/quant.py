"""Quantize and dequantize optimizer moments: the public face of the state formats.

A moment of a parameter of shape (..., d) in a block format is a `Quantized`: codes
(uint8, shape (..., d), or (..., d/2) for 4-bit codes), one fp32 scale per block of B
contiguous elements along the last axis (shape (..., d/B)) and, for fp8, one fp32
expansion exponent per block. Every array keeps the parameter's leading shape and
splits its last axis in whole blocks, so each can carry the parameter's own sharding;
the code map and B are static fields (they live in the tree structure, not in arrays).

Formats (`state_format`):
- fp32: the moment as is. bf16: cast to bfloat16 (round to nearest even).
- int8: tapered 8-bit maps; fp8: E4M3 with per-block dynamic range expansion;
  int4 (experimental): tapered 4-bit maps. The arithmetic, shared with the Pallas
  kernels, is `pallas_kernels.fused_adamw.reference`; the maps are literal tables in
  `codes.py`.
`role` picks the map: "m" (signed, the first moment) or "v" (unsigned, for the stored
second-moment domain sqrt(v): the optimizer passes sqrt(v), see `compressed.py`).

Blocks are decided from the global shape only (`leaf_block_size`): B, or the largest
of B/2, B/4, ... down to 32 that divides the last axis; none -> not quantized.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from efficient_train.optim.choices import BLOCK_SIZES, STATE_FORMATS
from efficient_train.optim.codes import TABLES
from pallas_kernels.fused_adamw import reference
from pallas_kernels.fused_adamw.reference import Blocks, Code

BLOCK_FORMATS: dict[str, tuple[Code, Code]] = {
    "int8": (reference.TAPERED8_SIGNED, reference.TAPERED8_UNSIGNED),
    "fp8": (reference.E4M3X_SIGNED, reference.E4M3X_UNSIGNED),
    "int4": (reference.TAPERED4_SIGNED, reference.TAPERED4_UNSIGNED),
}
ROLES = ("m", "v")


@flax.struct.dataclass
class Quantized:
    """One block-quantized moment of a parameter of shape (..., d)."""

    # Arrays in a state; the same structure also carries their PartitionSpecs or shardings
    # (optim/placement.py, shard_map specs), hence Any.
    codes: Any  # uint8 (..., d), or (..., d // 2) for 4-bit codes
    scales: Any  # float32 (..., d // block): absmax per block
    exponents: Any  # float32 like scales (e4m3 range expansion), else None
    code: Code = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the moment it stores."""
        return (*self.scales.shape[:-1], self.scales.shape[-1] * self.block)


def check_state_format(state_format: str) -> None:
    if state_format not in STATE_FORMATS:
        raise ValueError(f"state_format: {state_format!r} is not available; choose one of {', '.join(map(repr, STATE_FORMATS))}")


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size: {block_size!r} is not a power of two from {BLOCK_SIZES[0]} to {BLOCK_SIZES[-1]}; "
            f"choose one of {', '.join(map(str, BLOCK_SIZES))}"
        )


def leaf_block_size(shape: tuple[int, ...], block_size: int) -> int | None:
    """The block size of a leaf of this global shape: block_size halved until it divides."""
    if not shape:
        return None
    block = block_size
    while block >= BLOCK_SIZES[0]:
        if shape[-1] % block == 0:
            return block
        block //= 2
    return None


def codes_for(state_format: str, role: str) -> Code:
    check_state_format(state_format)
    if state_format not in BLOCK_FORMATS:
        raise ValueError(f"state_format: {state_format!r} has no block codes; block formats are {', '.join(BLOCK_FORMATS)}")
    if role not in ROLES:
        raise ValueError(f"role: {role!r} is not available; choose one of {', '.join(map(repr, ROLES))}")
    return BLOCK_FORMATS[state_format][ROLES.index(role)]


def to_blocks(x: jax.Array, block: int) -> jax.Array:
    """(..., d) -> (..., d // block, block): a view that keeps any sharding of the leading axes."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def as_blocks(q: Quantized) -> Blocks:
    """The codes, scales and exponents in the blocked layout the block arithmetic takes."""

    def per_block(x: jax.Array | None) -> jax.Array | None:
        return None if x is None else x[..., None]

    return Blocks(to_blocks(q.codes, q.codes.shape[-1] // q.scales.shape[-1]), per_block(q.scales), per_block(q.exponents))


def from_blocks(blocks: Blocks, code: Code, block: int) -> Quantized:
    def flat(x: jax.Array | None) -> jax.Array | None:
        return None if x is None else x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])

    return Quantized(flat(blocks.codes), flat(blocks.scales), flat(blocks.exponents), code, block)


def quantize_blocks(x: jax.Array, code: Code, block: int) -> Quantized:
    """Quantize float32 x (..., d) with d a multiple of `block`."""
    if x.shape[-1] % block:
        raise ValueError(f"last axis {x.shape[-1]} is not a multiple of the block size {block}")
    blocks = reference.encode(reference.split(to_blocks(x.astype(jnp.float32), block), code), code)
    return from_blocks(blocks, code, block)


def dequantize_blocks(q: Quantized) -> jax.Array:
    parts = reference.decode(as_blocks(q), q.code)
    return reference.join(parts).reshape(q.shape)


def quantize(x: jax.Array, state_format: str, *, role: str = "m", block_size: int = 256) -> jax.Array | Quantized:
    """x in `state_format`: fp32 and bf16 as arrays, block formats as `Quantized`.

    For block formats x's last axis must have a block size (`leaf_block_size`).
    """
    check_state_format(state_format)
    check_block_size(block_size)
    if state_format == "fp32":
        return x.astype(jnp.float32)
    if state_format == "bf16":
        return x.astype(jnp.bfloat16)
    block = leaf_block_size(tuple(x.shape), block_size)
    if block is None:
        raise ValueError(f"shape {tuple(x.shape)}: no block size from {block_size} down to {BLOCK_SIZES[0]} divides its last axis")
    return quantize_blocks(x, codes_for(state_format, role), block)


def dequantize(q: jax.Array | Quantized) -> jax.Array:
    """The float32 values a stored moment holds."""
    return dequantize_blocks(q) if isinstance(q, Quantized) else q.astype(jnp.float32)


def code_values(code: Code) -> np.ndarray:
    """The literal table of a code map (float32, indexed by code)."""
    return np.asarray(TABLES[code.name], dtype=np.float32)

