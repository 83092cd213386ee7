"""Block formats and the fused AdamW step on blocks, in plain JAX.

This is the one implementation of the compressed-state arithmetic: the XLA path of
`efficient_train.optim` calls these functions on whole (global) arrays viewed as
blocks, and the Pallas kernels call the very same functions on the tiles they load,
which is why the kernels equal the XLA path bit for bit in interpret mode.

A block is a contiguous run of B elements along the last axis; every function here
takes arrays whose last axis is one block (any leading shape) and reduces over that
axis only (keepdims), so blocks never interact. A block is passed as `parts`: one
array holding it whole for 8-bit codes, its two halves for 4-bit codes, whose bytes
pack element j with element j + B/2; so a kernel works on the halves it loads and
never needs the interleave or concatenation that Triton cannot lower. The XLA path
splits and joins blocks the same way: XLA's CPU compiler contracts multiply-adds into
FMAs within a fusion, so bit-equality needs the same operation graph on both sides.

Formats of one moment (`Code`):
- tapered (8 or 4 bits): block absmax in fp32, each element's |x| / absmax as a
  tapered code (codes.py), signed for m; the second moment is stored as sqrt(v) with
  the unsigned map and `never_zero`.
- e4m3 (8 bits), COAT's dynamic range expansion: per block, k is chosen so that
  (max|x| / min|x|)^k, min over nonzero elements, equals E4M3's normal range
  448 / 2^-6; each element is stored as E4M3(448 (|x| / absmax)^k). The block keeps
  absmax and k in fp32 (decode: absmax (y / 448)^(1/k)). Targeting the normal range,
  not the subnormal one, keeps 3 mantissa bits on every element. The second moment
  is stored as sqrt(v) here too, so every format has the same v domain.
Powers are exp2(k log2(r)): XLA's CPU runtime gives the same bits for these in every
fusion and shape (tests check byte-identical states across meshes). Divisions by a
per-block or per-step scalar are written as multiplications by its reciprocal: XLA
rewrites x / broadcast(s) that way on its own in some fusions and not in others, so
spelling it out is what keeps the kernel and the XLA path bit-identical.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fused_adamw import codes

Parts = tuple[jax.Array, ...]
_LOG2_E4M3_RANGE = math.log2(codes.E4M3_MAX / codes.E4M3_MIN_NORMAL)


@dataclasses.dataclass(frozen=True)
class Code:
    """How one moment's elements are coded; `name` is the id checkpoints record."""

    name: str
    family: str  # "tapered" | "e4m3"
    bits: int  # 8 or 4 bits per element
    signed: bool
    never_zero: bool = False

    @property
    def mag_bits(self) -> int:
        return self.bits - 1 if self.signed else self.bits

    @property
    def expanded(self) -> bool:
        """Whether blocks carry an expansion exponent k besides their scale."""
        return self.family == "e4m3"


TAPERED8_SIGNED = Code("tapered8s", "tapered", 8, True)
TAPERED8_UNSIGNED = Code("tapered8u_nz", "tapered", 8, False, never_zero=True)
TAPERED4_SIGNED = Code("tapered4s", "tapered", 4, True)
TAPERED4_UNSIGNED = Code("tapered4u_nz", "tapered", 4, False, never_zero=True)
E4M3X_SIGNED = Code("e4m3x_s", "e4m3", 8, True)
E4M3X_UNSIGNED = Code("e4m3x_u", "e4m3", 8, False)


class Blocks(NamedTuple):
    """One moment of a group of blocks: codes (uint8; 4-bit codes packed two to a
    byte), scales (fp32 absmax per block, keepdims) and, for e4m3, the exponents k."""

    # Arrays, or (flattened by the optimizer for the kernel) None where a moment has none.
    codes: Any
    scales: Any
    exponents: Any  # None unless e4m3


def split(x: jax.Array, code: Code) -> Parts:
    """Blocks (last axis) as the parts `code` works on."""
    if code.bits == 8:
        return (x,)
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def join(parts: Parts) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _absmax(parts: Parts) -> jax.Array:
    out = jnp.max(jnp.abs(parts[0]), axis=-1, keepdims=True)
    for part in parts[1:]:
        out = jnp.maximum(out, jnp.max(jnp.abs(part), axis=-1, keepdims=True))
    return out


def _absmin_nonzero(parts: Parts) -> jax.Array:
    def absmin(part: jax.Array) -> jax.Array:
        a = jnp.abs(part)
        return jnp.min(jnp.where(a > 0, a, jnp.inf), axis=-1, keepdims=True)

    out = absmin(parts[0])
    for part in parts[1:]:
        out = jnp.minimum(out, absmin(part))
    return out


def _element_codes(r: jax.Array, negative: jax.Array, code: Code, exponents: jax.Array | None) -> jax.Array:
    if code.family == "tapered":
        magnitude = codes.encode_tapered(r, code.mag_bits, code.never_zero)
    else:
        assert exponents is not None, "e4m3 codes carry exponents"
        y = jnp.minimum(jnp.exp2(exponents * jnp.log2(r)) * codes.E4M3_MAX, codes.E4M3_MAX)
        magnitude = codes.encode_e4m3(y)
    return codes.with_sign(magnitude, negative, code.mag_bits) if code.signed else magnitude


def _element_values(c: jax.Array, code: Code, exponents: jax.Array | None) -> jax.Array:
    magnitude, negative = codes.split_sign(c, code.mag_bits) if code.signed else (c, None)
    if code.family == "tapered":
        r = codes.decode_tapered(magnitude, code.mag_bits)
    else:
        assert exponents is not None, "e4m3 codes carry exponents"
        r = jnp.exp2(jnp.log2(codes.decode_e4m3(magnitude) * (1.0 / codes.E4M3_MAX)) * (1.0 / exponents))
    return r if negative is None else jnp.where(negative, -r, r)


def _all_finite(parts: Parts) -> jax.Array:
    # A max over 0/1 flags: Triton lowers no boolean reductions, and the flags hold no NaN.
    bad = jnp.max(jnp.where(jnp.isfinite(parts[0]), 0.0, 1.0), axis=-1, keepdims=True)
    for part in parts[1:]:
        bad = jnp.maximum(bad, jnp.max(jnp.where(jnp.isfinite(part), 0.0, 1.0), axis=-1, keepdims=True))
    return bad == 0.0


def encode(parts: Parts, code: Code) -> Blocks:
    """Quantize blocks given as `parts` (float32). A block holding a NaN or inf gets a NaN
    scale, so it decodes to NaN: max-reductions may drop NaNs (XLA's CPU backend does),
    which would otherwise store a finite code for a NaN."""
    scales = jnp.where(_all_finite(parts), _absmax(parts), jnp.nan)
    safe = jnp.where(scales > 0, scales, 1.0)
    exponents = None
    if code.expanded:
        ratio = scales / _absmin_nonzero(parts)  # 0 for an all-zero block
        exponents = jnp.where(ratio > 1.0, _LOG2_E4M3_RANGE / jnp.log2(jnp.maximum(ratio, 1.0)), 1.0)
    inverse = 1.0 / safe
    element = [_element_codes(jnp.abs(x) * inverse, x < 0, code, exponents) for x in parts]
    packed = element[0] if code.bits == 8 else element[0] | (element[1] << 4)
    return Blocks(packed.astype(jnp.uint8), scales, exponents)


def decode(blocks: Blocks, code: Code) -> Parts:
    """Dequantize to float32 parts."""
    c = blocks.codes.astype(jnp.int32)
    element = (c,) if code.bits == 8 else (c & 15, c >> 4)
    return tuple(_element_values(e, code, blocks.exponents) * blocks.scales for e in element)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Static AdamW constants; the per-step scalars travel as `Scalars`."""

    b1: float
    b2: float
    eps: float
    eps_root: float
    weight_decay: float  # 0.0 where the decay mask excludes the parameter


class Scalars(NamedTuple):
    """Per-step float32 scalars: -learning rate, 1 - b1^t and 1 - b2^t."""

    neg_lr: jax.Array
    bias1: jax.Array
    bias2: jax.Array


def adam_moments(g: jax.Array, m: jax.Array, v: jax.Array, hyper: Hyper) -> tuple[jax.Array, jax.Array]:
    """The moment updates, in optax.scale_by_adam's exact operation order."""
    m = (1 - hyper.b1) * g + hyper.b1 * m
    v = (1 - hyper.b2) * (g * g) + hyper.b2 * v
    return m, v


def adam_update(m: jax.Array, v: jax.Array, p: jax.Array, hyper: Hyper, s: Scalars) -> jax.Array:
    """The update optax.adamw returns (bias correction, eps, decoupled decay, -lr), in its
    exact operation order (the compressed optimizer's fp32 leaves use this)."""
    u = (m / s.bias1) / (jnp.sqrt(v / s.bias2 + hyper.eps_root) + hyper.eps)
    return _decay_and_scale(u, p, hyper, s)


def _decay_and_scale(u: jax.Array, p: jax.Array, hyper: Hyper, s: Scalars) -> jax.Array:
    if hyper.weight_decay:
        u = u + hyper.weight_decay * p
    return s.neg_lr * u


def adamw_blocks(
    g: Parts, p: Parts, m: Blocks, v: Blocks, m_code: Code, v_code: Code, hyper: Hyper, s: Scalars, emit_params: bool
) -> tuple[Parts, Blocks, Blocks]:
    """One AdamW step on blocks: decode m and sqrt(v), update, encode.

    Returns (new params if `emit_params` else updates, new m, new sqrt(v)), the
    updates from the fp32 moments before they are re-quantized.
    """
    inv_bias1, inv_bias2 = 1.0 / s.bias1, 1.0 / s.bias2
    out, new_m, new_s = [], [], []
    for gi, pi, mi, si in zip(g, p, decode(m, m_code), decode(v, v_code)):
        mi, vi = adam_moments(gi, mi, si * si, hyper)
        u = _decay_and_scale((mi * inv_bias1) / (jnp.sqrt(vi * inv_bias2 + hyper.eps_root) + hyper.eps), pi, hyper, s)
        out.append(pi + u if emit_params else u)
        new_m.append(mi)
        new_s.append(jnp.sqrt(vi))
    return tuple(out), encode(tuple(new_m), m_code), encode(tuple(new_s), v_code)
