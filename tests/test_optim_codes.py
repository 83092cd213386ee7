"""Code maps and encoders of the compressed optimizer states: exact, against literal tables.

The literal tables (efficient_train/optim/codes.py) are the specification; the
arithmetic encoders and decoders the XLA path and the kernels share must equal them
code by code, and the encoders must pick the nearest code (ties to the larger
magnitude; E4M3 to even, as XLA's own float8 conversion).
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
# name: (entries, sum of |values| over non-NaN entries, smallest nonzero magnitude)
GOLDEN = {
    "tapered8s": (256, 83.28564453125, 2.0**-12),
    "tapered8u_nz": (256, 82.78570556640625, 2.0**-14),
    "tapered4s": (16, 6.125, 2.0**-4),
    "tapered4u_nz": (16, 5.640625, 2.0**-6),
    "e4m3x_s": (256, 10815.75, 2.0**-9),
    "e4m3x_u": (128, 5407.875, 2.0**-9),
}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_literal_tables_are_golden(code):
    table = quant.code_values(code)
    entries, total, smallest = GOLDEN[code.name]
    finite = table[~np.isnan(table)]
    assert len(table) == entries
    assert math.fsum(abs(float(x)) for x in finite) == total
    assert np.min(np.abs(finite[finite != 0])) == smallest and np.max(np.abs(finite)) == (448.0 if code.expanded else 1.0)
    magnitudes = table[: 2 ** code.mag_bits]
    assert np.all(np.diff(magnitudes[~np.isnan(magnitudes)]) > 0)  # codes count up with the magnitude
    if code.signed:
        assert _bits_equal(table[2 ** code.mag_bits:], -magnitudes)  # sign-magnitude


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
