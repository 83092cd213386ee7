"""Element codes of the compressed optimizer states, as exact integer arithmetic.

Two families, each an encoder (value -> code) and a decoder (code -> value) written
with bit casts, shifts, integer adds, compares and selects only. Every step is exact,
so the encoder returns the nearest code (ties to the larger magnitude for the tapered
maps, to even for E4M3) on any backend, inside a Pallas kernel (Triton, Mosaic,
interpret) as in plain XLA: no table gathers, no transcendental functions.

Tapered maps (the 8- and 4-bit dynamic maps). A block-wise dynamic map spends many
codes near the block's absmax and few on tiny values, so small values keep their order
of magnitude without costing precision at the top. Here the map is a float whose
mantissa shrinks with the magnitude: for a magnitude field of `mag_bits` bits, let
M = mag_bits - 2; the two octaves below 1 carry M mantissa bits, the next two M - 1,
and so on down to two octaves with none, then zero (K = 2M + 2 octaves in all), plus
1.0 itself. That uses every code: 2 (2^(M+1) - 1) + 1 = 2^mag_bits - 1 nonzero values.
Codes count up with the magnitude (0 is zero, 2^mag_bits - 1 is 1.0), so the nonzero
codes of the lower octave of the pair with p mantissa bits start at 1 + 2 (2^p - 1).
Rounding adds half a unit in the last kept place to the float's bits and truncates;
a carry into the exponent lands on the next octave's first value, which is the
nearest there too because octave spacings grow with the magnitude. With
`never_zero`, a positive value below the smallest code encodes to it instead of to
zero: the second moment uses this, so a stored sqrt(v) is zero only when v is, and
m / (sqrt(v) + eps) cannot blow up on a v that rounded away.

E4M3 (fp8, as `jnp.float8_e4m3fn`: bias 7, 3 mantissa bits, subnormals, max 448, no
infinities) for magnitudes in [0, 448], codes 0..126: normal values round to nearest
even on the float's bits; below 2^-6 the code is the value in units of 2^-9, rounded
to nearest even. The bit patterns equal XLA's own conversion (a test checks), and are
stored as uint8 so that kernels need no fp8 support.

Signs, where a code carries one, sit in the top bit of the code (sign-magnitude);
negative values that round to zero drop their sign, so -0 is never produced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MAX_CODE = 126


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _float(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def tapered_octaves(mag_bits: int) -> int:
    """K: octaves below 1.0 that hold codes; the smallest nonzero value is 2^-K."""
    return 2 * (mag_bits - 2) + 2


def encode_tapered(r: jax.Array, mag_bits: int, never_zero: bool) -> jax.Array:
    """Nearest tapered code (int32 in [0, 2^mag_bits - 1]) of r in [0, 1], float32."""
    top = mag_bits - 2
    octaves = tapered_octaves(mag_bits)
    bits = _bits(r)
    octave = 127 - (bits >> 23)  # r in [2^-octave, 2^(1 - octave))
    kept = top - ((jnp.clip(octave, 1, octaves) - 1) >> 1)  # mantissa bits of that octave
    drop = 23 - kept
    rounded = (bits + (1 << (drop - 1))) >> drop  # (exponent << kept) | mantissa, carry included
    exponent = rounded >> kept
    mantissa = rounded - (exponent << kept)
    octave = 127 - exponent
    kept = top - ((octave - 1) >> 1)  # after a carry: the octave above (1.0 gives top + 1)
    code = 1 + 2 * ((1 << kept) - 1) + (octave & 1) * (1 << kept) + mantissa
    if never_zero:
        smallest = jnp.where(r > 0, 1, 0)
    else:
        smallest = jnp.where(r >= 2.0 ** -(octaves + 1), 1, 0)
    return jnp.where(127 - (bits >> 23) > octaves, smallest, code)


def decode_tapered(code: jax.Array, mag_bits: int) -> jax.Array:
    """float32 value in [0, 1] of tapered codes (int32 in [0, 2^mag_bits - 1])."""
    octaves = tapered_octaves(mag_bits)
    t = jnp.maximum(code, 1) - 1  # rank among the nonzero codes
    kept = (_bits((t + 2).astype(jnp.float32)) >> 23) - 128  # floor(log2(t + 2)) - 1
    within = t - 2 * ((1 << kept) - 1)
    upper = within >> kept  # 1 for the upper octave of the pair
    mantissa = within - (upper << kept)
    octave = octaves - 2 * kept - upper
    value = _float(((127 - octave) << 23) | (mantissa << (23 - kept)))
    return jnp.where(code == 0, 0.0, value)


def encode_e4m3(y: jax.Array) -> jax.Array:
    """E4M3 bit pattern (int32 in [0, 126]) nearest to y in [0, 448], float32."""
    bits = _bits(y)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) >> 20) - ((127 - 7) << 3)
    units = y * 512.0  # exact: a power of two
    whole = jnp.floor(units)
    frac = units - whole
    whole = whole.astype(jnp.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
    subnormal = whole + up.astype(jnp.int32)
    return jnp.where(y >= E4M3_MIN_NORMAL, normal, subnormal)


def decode_e4m3(code: jax.Array) -> jax.Array:
    """float32 value of E4M3 bit patterns (int32 in [0, 126])."""
    normal = _float((code + ((127 - 7) << 3)) << 20)
    return jnp.where(code >= 8, normal, code.astype(jnp.float32) * (1.0 / 512.0))


def with_sign(magnitude_code: jax.Array, negative: jax.Array, mag_bits: int) -> jax.Array:
    """Put the sign in bit `mag_bits`, except on zero codes."""
    return magnitude_code | ((negative & (magnitude_code > 0)).astype(jnp.int32) << mag_bits)


def split_sign(code: jax.Array, mag_bits: int) -> tuple[jax.Array, jax.Array]:
    """(magnitude code, negative) of a signed code."""
    return code & ((1 << mag_bits) - 1), (code >> mag_bits) == 1
