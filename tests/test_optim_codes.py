"""Code maps and encoders of the compressed optimizer states: exact, against literal tables.

The literal tables (efficient_train/optim/codes.py) are the specification, and they are
checked entry by entry against the maps rebuilt here from their written definitions
(octaves and mantissa widths; float8_e4m3fn's bit layout). The arithmetic encoders and
decoders the XLA path and the kernels share must equal the tables code by code, the
encoders must pick the nearest code (ties to the larger magnitude; E4M3 to even, as
XLA's own float8 conversion), and a round trip stays within the bound the map's gaps give.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_train.optim import codes as tables
from efficient_train.optim import quant
from pallas_kernels.fused_adamw import codes, reference

TAPERED = {  # code -> magnitude bits
    reference.TAPERED8_SIGNED: 7,
    reference.TAPERED8_UNSIGNED: 8,
    reference.TAPERED4_SIGNED: 3,
    reference.TAPERED4_UNSIGNED: 4,
}
ALL_CODES = (*TAPERED, reference.E4M3X_SIGNED, reference.E4M3X_UNSIGNED)


# The maps rebuilt here from their definitions (codes.py's docstring, float8_e4m3fn's bit
# layout), in Python floats, without reading the tables or the encoders.
def _tapered_magnitudes(mag_bits: int) -> list[float]:
    """0, 1.0 and below 1.0 octave after octave ([2^-1, 1), [2^-2, 2^-1), ...) with
    mag_bits - 2 mantissa bits for two octaves, one bit fewer for the next two, and so on
    down to two octaves of 0 bits; sorted."""
    values, octave = [0.0, 1.0], -1
    for mantissa_bits in range(mag_bits - 2, -1, -1):
        for _ in range(2):
            values += [2.0**octave * (1 + k / 2**mantissa_bits) for k in range(2**mantissa_bits)]
            octave -= 1
    return sorted(values)


def _e4m3_magnitudes() -> list[float]:
    """float8_e4m3fn codes 0..127 from their bits: 4 exponent bits (bias 7), 3 mantissa
    bits, subnormals at exponent 0, S.1111.111 NaN, no infinities."""
    out = []
    for c in range(128):
        exponent, mantissa = c >> 3, c & 7
        if c == 127:
            out.append(math.nan)
        elif exponent == 0:
            out.append(mantissa / 8 * 2.0**-6)
        else:
            out.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return out


def _by_definition(code: reference.Code) -> np.ndarray:
    """The whole map indexed by code: magnitudes, then (signed maps, sign-magnitude) their negatives."""
    magnitudes = _tapered_magnitudes(code.mag_bits) if code.family == "tapered" else _e4m3_magnitudes()
    return np.asarray(magnitudes + ([-x for x in magnitudes] if code.signed else []), np.float32)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_tables_follow_their_definitions(code):
    table = quant.code_values(code)
    # every byte value is a code, except unsigned E4M3's: the float8 codes with the sign bit clear
    assert len(table) == (128 if code.family == "e4m3" and not code.signed else 2**code.bits)
    assert _bits_equal(table, _by_definition(code))
    magnitudes = table[: 2**code.mag_bits]
    finite = magnitudes[~np.isnan(magnitudes)]
    assert np.all(np.diff(finite) > 0)  # codes count up with the magnitude
    assert finite[0] == 0.0 and 1.0 in finite
    if code.signed:
        assert _bits_equal(table[2**code.mag_bits:], -magnitudes)  # sign-magnitude: code 2^m + c is -(code c)
    if code.family == "tapered":
        assert finite[-1] == 1.0 and finite[1] == 2.0 ** -(2 * (code.mag_bits - 1))  # 2 octaves per mantissa width
        # Spacing within each octave [2^o, 2^(o+1)): 2^(o - mantissa bits), widths m-2, m-2, m-3, m-3, ..., 0, 0.
        widths = [w for w in range(code.mag_bits - 2, -1, -1) for _ in range(2)]
        for octave, width in zip(range(-1, -len(widths) - 1, -1), widths):
            band = finite[(finite >= 2.0**octave) & (finite < 2.0 ** (octave + 1))]
            assert len(band) == 2**width and np.all(np.diff(np.append(band, 2.0 ** (octave + 1))) == 2.0 ** (octave - width))
    else:
        assert finite[-1] == 448.0 and finite[1] == 2.0**-9 and math.isnan(magnitudes[127])


def _round_trip_bound(code: reference.Code, r: np.ndarray, exponent: float | None) -> np.ndarray:
    """The largest |r - decoded r| the map allows for block-relative magnitudes r in [0, 1]:
    half the gap between the two entries around r for the nearest-code tapered maps (the
    smallest nonzero entry itself where `never_zero` lifts a tiny r to it); for E4M3 with
    range expansion y = 448 r^k is rounded to the nearest entry, so r is off by at most
    what the midpoint between the two entries around y decodes to, from either entry."""
    table = np.asarray(_by_definition(code)[: 2**code.mag_bits], np.float64)
    table = table[~np.isnan(table)]
    if code.family == "e4m3":
        def decode(y):
            return (y / 448.0) ** (1.0 / exponent)

        above = np.clip(np.searchsorted(table, 448.0 * r**exponent, side="left"), 1, len(table) - 1)
        low, high = table[above - 1], table[above]
        middle = decode((low + high) / 2)
        return np.maximum(middle - decode(low), decode(high) - middle)
    above = np.clip(np.searchsorted(table, r, side="left"), 1, len(table) - 1)
    bound = (table[above] - table[above - 1]) / 2
    if code.never_zero:
        bound = np.where((r > 0) & (r < table[1]), table[1], bound)
    return bound


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_round_trip_error_within_the_maps_gaps(code):
    """quantize then dequantize: each element within its bound (above) x its block's absmax."""
    rng = np.random.default_rng(11)
    block = 256
    magnitudes = np.concatenate([rng.random((4, block)), 10.0 ** rng.uniform(-5, 0, (4, block))])
    x = magnitudes * (np.where(rng.random(magnitudes.shape) < 0.5, -1, 1) if code.signed else 1)
    x = (x * 10.0 ** rng.uniform(-3, 3, (len(x), 1))).astype(np.float32)  # blocks of different scales
    q = quant.quantize_blocks(jnp.asarray(x), code, block)
    back = np.asarray(quant.dequantize(q), np.float64)
    scales = np.asarray(q.scales, np.float64)
    assert np.array_equal(scales[:, 0], np.max(np.abs(x), axis=1))
    for row in range(len(x)):
        exponent = float(q.exponents[row, 0]) if code.expanded else None
        r = np.abs(x[row].astype(np.float64)) / scales[row, 0]
        bound = _round_trip_bound(code, r, exponent) * scales[row, 0]
        error = np.abs(back[row] - x[row])
        # plus float32 rounding of the scaled magnitude (and of exp2/log2 for E4M3)
        assert np.all(error <= bound * (1 + 1e-5) + 1e-6 * scales[row, 0]), (row, np.max(error / bound))
        assert np.all(np.sign(back[row][back[row] != 0]) == np.sign(x[row][back[row] != 0]))


@pytest.mark.parametrize("code", TAPERED, ids=lambda c: c.name)
def test_tapered_decoder_equals_table(code):
    mag_bits = TAPERED[code]
    all_codes = jnp.arange(2**mag_bits, dtype=jnp.int32)
    assert _bits_equal(codes.decode_tapered(all_codes, mag_bits), quant.code_values(code)[: 2**mag_bits])


def test_e4m3_decoder_equals_table_and_float8():
    all_codes = np.arange(127, dtype=np.int32)
    decoded = np.asarray(codes.decode_e4m3(jnp.asarray(all_codes)))
    assert _bits_equal(decoded, np.asarray(tables.E4M3[:127]))
    assert _bits_equal(decoded, all_codes.astype(np.uint8).view(jnp.float8_e4m3fn).astype(np.float32))
    assert math.isnan(tables.E4M3[127])


def _random_magnitudes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    uniform = rng.random(n // 2)
    logarithmic = 10.0 ** rng.uniform(-9, 0, n - n // 2)
    return np.concatenate([uniform, logarithmic]).astype(np.float32)


def _nearest(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Brute force: index of the nearest table entry, ties to the larger one (float64)."""
    out = np.empty(len(values), np.int64)
    table64 = table.astype(np.float64)
    for start in range(0, len(values), 10_000):
        chunk = values[start:start + 10_000].astype(np.float64)[:, None]
        distance = np.abs(chunk - table64[None, :])
        # argmin over the reversed table picks the last (larger) of equal distances
        out[start:start + 10_000] = len(table) - 1 - np.argmin(distance[:, ::-1], axis=1)
    return out


@pytest.mark.parametrize("code", TAPERED, ids=lambda c: c.name)
def test_tapered_encoder_is_nearest_code(code):
    mag_bits = TAPERED[code]
    table = quant.code_values(code)[: 2**mag_bits]
    r = _random_magnitudes(100_000, seed=mag_bits)
    # add every midpoint between neighbours (exact in float32 here): ties go up
    midpoints = ((table[1:].astype(np.float64) + table[:-1]) / 2).astype(np.float32)
    r = np.concatenate([r, midpoints, table])
    expected = _nearest(r, table)
    if code.never_zero:
        expected = np.where((r > 0) & (expected == 0), 1, expected)
    got = np.asarray(codes.encode_tapered(jnp.asarray(r), mag_bits, code.never_zero))
    np.testing.assert_array_equal(got, expected)


def test_e4m3_encoder_is_nearest_even_and_equals_xla():
    rng = np.random.default_rng(3)
    y = np.concatenate([rng.random(50_000) * 448, 2.0 ** rng.uniform(-14, np.log2(448), 50_000)]).astype(np.float32)
    table = np.asarray(tables.E4M3[:127], np.float32)
    midpoints = ((table[1:].astype(np.float64) + table[:-1]) / 2).astype(np.float32)
    y = np.minimum(np.concatenate([y, midpoints, table]), 448.0)
    got = np.asarray(codes.encode_e4m3(jnp.asarray(y)))
    np.testing.assert_array_equal(got, np.asarray(jnp.asarray(y).astype(jnp.float8_e4m3fn)).view(np.uint8))
    nearest_up = _nearest(y, table)
    ties = np.abs(y.astype(np.float64) - table[nearest_up]) == np.abs(y.astype(np.float64) - table[np.maximum(nearest_up - 1, 0)])
    even = np.where(ties & (nearest_up % 2 == 1), nearest_up - 1, nearest_up)
    np.testing.assert_array_equal(got, even)


def _all_code_block(code: reference.Code) -> np.ndarray:
    """One block (last axis) holding every code of the map (the redundant -0 excluded),
    each once, padded with zeros; for E4M3 with expansion, codes spanning the normal range."""
    if code.expanded:
        magnitudes = np.concatenate([[0], np.arange(8, 127)])
    else:
        magnitudes = np.arange(2**code.mag_bits)
    values = np.concatenate([magnitudes, (magnitudes[magnitudes > 0] | (1 << code.mag_bits))]) if code.signed else magnitudes
    block = 256 if code.bits == 8 else 32
    return np.concatenate([values, np.zeros(block - len(values), np.int64)]).astype(np.uint8)


def _pack(element_codes: np.ndarray, code: reference.Code) -> np.ndarray:
    if code.bits == 8:
        return element_codes
    half = element_codes.shape[-1] // 2
    return element_codes[..., :half] | (element_codes[..., half:] << 4)


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_quantize_of_dequantize_is_identity(code):
    element = _all_code_block(code)
    block = element.shape[-1]
    packed = _pack(element[None], code)
    exponents = jnp.full((1, 1), 2.5) if code.expanded else None
    for scale in (1.0, 3.75e-3):
        q = quant.Quantized(jnp.asarray(packed), jnp.full((1, 1), scale, jnp.float32), exponents, code, block)
        again = quant.quantize_blocks(quant.dequantize(q), code, block)
        np.testing.assert_array_equal(np.asarray(again.codes), packed)
        assert float(again.scales[0, 0]) == np.float32(scale)


@pytest.mark.parametrize("state_format", ["int8", "fp8", "int4"])
def test_signs_kept_and_zero_blocks_give_no_nan(state_format):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 512)).astype(np.float32)
    x[1] = 0.0  # two all-zero blocks
    x[2, :256] = -np.abs(x[2, :256])
    q = quant.quantize(jnp.asarray(x), state_format, role="m", block_size=256)
    back = np.asarray(quant.dequantize(q))
    assert np.all(np.isfinite(back)) and np.all(back[1] == 0) and np.all(np.asarray(q.scales)[1] == 0)
    nonzero = back != 0
    assert np.all(np.sign(back[nonzero]) == np.sign(x[nonzero]))
    assert not np.any(np.signbit(back) & (back == 0))  # no -0 codes
    v = quant.quantize(jnp.abs(jnp.asarray(x)), state_format, role="v", block_size=256)
    assert np.all(np.isfinite(np.asarray(quant.dequantize(v))))


@pytest.mark.parametrize("state_format", ["int8", "fp8", "int4"])
def test_second_moment_never_rounds_away(state_format):
    x = np.full((1, 256), 1e-12, np.float32)
    x[0, 0] = 1.0  # the block's absmax dwarfs the rest
    x[0, 1] = 0.0
    back = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x), state_format, role="v", block_size=256)))
    assert back[0, 1] == 0 and np.all(back[0, 2:] > 0)


@pytest.mark.parametrize("state_format,bits_per_param", [("int8", 1 + 4 / 256), ("fp8", 1 + 8 / 256), ("int4", 0.5 + 4 / 256)])
def test_layout_follows_the_global_shape(state_format, bits_per_param):
    x = jnp.ones((3, 5, 768))  # 768 = 3 x 256
    q = quant.quantize(x, state_format, block_size=256)
    assert q.block == 256 and q.scales.shape == (3, 5, 3) and q.shape == x.shape
    assert q.codes.shape == (3, 5, 768 // (8 // q.code.bits)) and q.codes.dtype == jnp.uint8
    assert (q.exponents is not None) == (state_format == "fp8")
    stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(q))
    assert stored == pytest.approx(bits_per_param * x.size)
    assert quant.leaf_block_size((4, 96), 256) == 32 and quant.leaf_block_size((4, 640), 256) == 128
    assert quant.leaf_block_size((4, 100), 256) is None and quant.leaf_block_size((), 256) is None
