"""Sequence parallelism (ulysses, ring, all_gather), proven on 8 simulated CPU devices.

Exactness: the model's attention dispatch, run under a shard_map with the sequence
context on S devices (inputs in the mode's layout: zigzag for ring), gives the dense
single-device attention's output and q, k, v gradients, with GQA and packed segments
(padding included), causal and not. The trainer's end-to-end equivalence for S=4
(data=2 x sequence=4, ZeRO-3, and sequence=4 x tensor=2) lives in tests/test_zero.py
with the other layouts. From the compiled programs: which collectives each mode runs
and the per-device activation memory at S=8 against S=1.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from efficient_train.config import ConfigError, validate
from efficient_train.data import build_loader
from efficient_train.models.attention import attention
from efficient_train.parallel import layout
from efficient_train.parallel import sequence as sequence_parallel
from efficient_train.train.estimate import estimate_memory
from tests.support.hlo_utils import collectives
from tests.support.zero_setup import small_config

B, T, H, KV, D = 2, 32, 8, 2, 8  # KV < S for S in {4, 8}: Ulysses repeats kv heads
MODES = ("all_gather", "ulysses", "ring")


def _packed_ids(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Documents of random lengths (the first continued from an earlier window), then padding."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for row in range(B):
        start, doc = 0, 1
        while start < T - 3:
            n = min(int(rng.integers(1, T // 2)), T - 3 - start)
            seg[row, start:start + n] = doc
            pos[row, start:start + n] = np.arange(n) + (7 if doc == 1 else 0)
            start, doc = start + n, doc + 1
    return seg, pos


@functools.cache
def _case(mode: str, size: int, causal: bool, impl: str, window: int | None = None, softcap: float | None = None):
    """Inputs, the dense reference (loss, grads), the sharded run and its compiled program
    (window: a sliding window, passed traced as a scanned layer passes it)."""
    rng = np.random.default_rng(size * 10 + causal)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, T, KV, D)).astype(np.float32) for _ in range(2))
    weights = rng.standard_normal((B, T, H, D)).astype(np.float32)
    seg, pos = _packed_ids(rng)

    def dense(q, k, v):
        out = attention(q, k, v, segment_ids=seg, positions=pos, causal=causal, impl="xla", window=window,
                        softcap=softcap)
        return jnp.sum(out * weights)

    reference = jax.value_and_grad(dense, argnums=(0, 1, 2))(q, k, v)

    order = layout.column_order(mode, T, size)
    order = np.arange(T) if order is None else order
    mesh = Mesh(np.array(jax.devices()[:size]), ("sequence",))

    def local(q, k, v, seg, pos):
        with sequence_parallel.sharding("sequence", mode):
            return attention(q, k, v, segment_ids=seg, positions=pos, causal=causal, impl=impl,
                             window=None if window is None else jnp.int32(window), softcap=softcap)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=P(None, "sequence"), out_specs=P(None, "sequence"),
                            check_vma=False)

    def loss(q, k, v):
        return jnp.sum(sharded(q, k, v, seg[:, order], pos[:, order]) * weights[:, order])

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    args = tuple(x[:, order] for x in (q, k, v))
    compiled = step.lower(*args).compile()
    return reference, compiled(*args), np.argsort(order), compiled


def _assert_equal_to_dense(mode: str, size: int, causal: bool, impl: str, **kwargs) -> None:
    (ref_loss, ref_grads), (loss, grads), inverse, _ = _case(mode, size, causal, impl, **kwargs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(grad)[:, inverse], ref, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("mode", MODES)
def test_equals_dense_attention(mode, size, causal):
    _assert_equal_to_dense(mode, size, causal, "xla")


@pytest.mark.parametrize("mode, size, causal", [("ring", 4, True), ("ring", 2, False), ("ulysses", 4, True)])
def test_pallas_local_kernel_equals_dense_attention(mode, size, causal):
    _assert_equal_to_dense(mode, size, causal, "pallas")


def _pallas_in_jaxpr(mode: str, size: int, window: int) -> bool:
    """Whether the sharded attention's program holds the Pallas kernel (no silent fallback)."""
    mesh = Mesh(np.array(jax.devices()[:size]), ("sequence",))
    x, ids = jnp.zeros((B, T, H, D)), jnp.ones((B, T), jnp.int32)

    def local(q, seg, pos):
        with sequence_parallel.sharding("sequence", mode):
            return attention(q, q[:, :, :KV], q[:, :, :KV], segment_ids=seg, positions=pos, impl="pallas",
                             window=jnp.int32(window))

    sharded = jax.shard_map(local, mesh=mesh, in_specs=P(None, "sequence"), out_specs=P(None, "sequence"),
                            check_vma=False)
    return "pallas_call" in str(jax.make_jaxpr(sharded)(x, ids, ids))


@pytest.mark.parametrize("mode, impl", [
    ("ring", "xla"),
    pytest.param("all_gather", "xla", marks=pytest.mark.slow),
    pytest.param("ulysses", "xla", marks=pytest.mark.slow),
    pytest.param("ring", "pallas", marks=pytest.mark.slow),
    pytest.param("all_gather", "pallas", marks=pytest.mark.slow),
])
def test_sliding_window_equals_dense_attention(mode, impl):
    """A window of 5 tokens over 4 devices: ring chunks are 4 tokens, so the window reaches
    across chunk pairs and devices; with 'pallas' the kernel runs it (its call is in the program)."""
    _assert_equal_to_dense(mode, 4, True, impl, window=5)
    if impl == "pallas":
        assert _pallas_in_jaxpr(mode, 4, 5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_softcap_equals_dense_attention(mode):
    _assert_equal_to_dense(mode, 4, True, "xla", window=7, softcap=2.0)


def _collectives(mode: str) -> list:
    return collectives(_case(mode, 8, True, "xla")[3].as_text())


def test_ulysses_exchanges_heads_and_never_gathers_activations():
    found = _collectives("ulysses")
    assert sum(c.op == "all-to-all" for c in found) >= 8  # q, k, v, out forward; their transposes
    # The only gathers are of the int ids [B, T]; no float tensor is ever whole-sequence.
    assert all(shape == (B, T) for c in found if c.op == "all-gather" for shape in c.shapes), found
    local_tokens = B * T // 8  # an exchanged tensor is never larger than a local [B, T/S, H, D]
    assert all(sum(map(math.prod, c.shapes)) <= local_tokens * H * D for c in found), found


def test_ring_passes_blocks_with_collective_permute():
    found = _collectives("ring")
    ops = {c.op for c in found}
    assert "collective-permute" in ops and not ops & {"all-gather", "all-to-all", "reduce-scatter"}, found
    # K/V blocks travel (forward and backward) and so do the fp32 dK/dV accumulators.
    assert {(B, T // 8, KV, D)} <= {shape for c in found if c.op == "collective-permute" for shape in c.shapes}


def _temp_bytes(mode: str, size: int, seq_len: int) -> int:
    config = small_config(**{"model.num_heads": H, "model.num_kv_heads": KV, "model.head_dim": D,
                             "data.seq_len": seq_len, "sequence_parallel.mode": mode, "mesh.sequence": size,
                             "mesh.data": 8 // size, "train.batch_size": 8 // size})
    return estimate_memory(config)["per_device_bytes"]["temp"]


@pytest.mark.slow
def test_activation_memory_at_s8_is_at_most_a_fifth_of_s1():
    # One sequence of 1024 tokens per device at S=1; the same sequence over 8 devices at S=8.
    single = _temp_bytes("all_gather", 1, 1024)
    for mode in MODES:
        assert _temp_bytes(mode, 8, 1024) <= 0.2 * single, mode


def test_zigzag_layout_and_loader():
    order = layout.zigzag_order(16, 4)  # 8 chunks of 2: device i holds chunks i and 7 - i
    np.testing.assert_array_equal(order.reshape(4, 2, 2)[:, :, 0] // 2, [[0, 7], [1, 6], [2, 5], [3, 4]])
    assert layout.column_order("ulysses", 16, 4) is None and layout.column_order("ring", 16, 1) is None
    config = small_config()
    plain = build_loader(config.data, vocab_size=256, global_batch_size=4).batch_at(3)
    zigzag = build_loader(config.data, vocab_size=256, global_batch_size=4,
                          column_order=layout.zigzag_order(32, 4)).batch_at(3)
    for name, value in zigzag.fields().items():  # every field reordered alike, once
        np.testing.assert_array_equal(value, plain.fields()[name][:, layout.zigzag_order(32, 4)], err_msg=name)


@pytest.mark.parametrize(
    "overrides, field, suggestion",
    [
        ({"sequence_parallel.mode": "ring", "data.seq_len": 36}, "data.seq_len", "'ulysses' or 'all_gather'"),
        ({"sequence_parallel.mode": "ulysses", "model.num_heads": 6, "model.num_kv_heads": 2},
         "sequence_parallel.mode", "'ring' or 'all_gather'"),
        ({"sequence_parallel.mode": "ulysses", "model.num_heads": 12, "model.num_kv_heads": 6},
         "sequence_parallel.mode", "'ring' or 'all_gather'"),
        ({"sequence_parallel.mode": "spiral", "model.num_heads": 6, "model.num_kv_heads": 2}, "sequence_parallel.mode",
         "'ring' or 'all_gather'"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_and_a_mode_that_fits(overrides, field, suggestion):
    config = small_config(**{"mesh.data": 2, "mesh.sequence": 4, **overrides})
    with pytest.raises(ConfigError) as error:
        validate(config, 8, check_paths=False)
    message = str(error.value)
    assert message.startswith(field + ":") and suggestion in message and "\n" not in message, message

