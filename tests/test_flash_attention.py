"""pallas_kernels.flash_attention: the kernels (run in the Pallas interpreter) against the
plain reference computed in float64; the reference against a numpy loop; lowering of the
GPU (Triton) and TPU (Mosaic) kernels for their platforms on this CPU machine.

Each kernel case compiles once: one jitted value-and-gradient of a loss that uses both
the output and the log-sum-exp, with random weights, so that the gradients through lse
are checked too. Offsets go in as traced arguments, as the ring of sequence parallelism
passes them.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import BlockSizes, flash_attention
from pallas_kernels.flash_attention import attention_reference

SMALL = BlockSizes(16, 16, 16, 16, 16, 16)  # several blocks even on short sequences


@dataclasses.dataclass(frozen=True)
class Case:
    t: int
    s: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    segments: bool = False
    q_offset: int = 0
    kv_offset: int = 0
    batch: int = 2
    dtype: str = "float32"
    blocks: BlockSizes = SMALL
    backend: str = "triton"
    window: int | None = None  # a sliding window, passed traced (as a scanned layer does)


def _inputs(case: Case, seed: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    b, dt = case.batch, jnp.dtype(case.dtype)
    q = jax.random.normal(keys[0], (b, case.t, case.heads, case.head_dim), dt)
    k = jax.random.normal(keys[1], (b, case.s, case.kv_heads, case.head_dim), dt)
    v = jax.random.normal(keys[2], (b, case.s, case.kv_heads, case.head_dim), dt)
    w_out = jax.random.normal(keys[3], q.shape, jnp.float32)
    w_lse = jax.random.normal(keys[4], (b, case.heads, case.t), jnp.float32)
    segs = (None, None)
    if case.segments:  # packed documents: sorted ids, a few per row, both starting at 0
        segs = tuple(jnp.sort(jax.random.randint(kk, (b, n), 0, 3), axis=1).at[:, 0].set(0)
                     for kk, n in ((keys[5], case.t), (keys[6], case.s)))
    return (q, k, v), (w_out, w_lse), segs


def _loss(attn, q, k, v, w_out, w_lse):
    out, lse = attn(q, k, v)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    loss = jnp.sum(out.astype(lse.dtype) * w_out) + jnp.sum(finite * w_lse)
    return loss, (out, lse)


def _run_kernel(case: Case, qkv, weights, segs):
    def f(q, k, v, w_out, w_lse, q_seg, kv_seg, q_offset, kv_offset, window):
        def attn(q, k, v):
            return flash_attention(
                q, k, v, causal=case.causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                q_offset=q_offset, kv_offset=kv_offset, return_lse=True,
                window=None if case.window is None else window,
                block_sizes=case.blocks, backend=case.backend, interpret=True)
        return jax.value_and_grad(_loss, argnums=(1, 2, 3), has_aux=True)(
            attn, q, k, v, w_out, w_lse)

    args = (*qkv, *weights, *segs, jnp.int32(case.q_offset), jnp.int32(case.kv_offset),
            jnp.int32(case.window or 0))
    (_, (out, lse)), grads = _compile(f, args)(*args)
    return out, lse, grads


def _compile(f, args):
    """jit with XLA's CPU backend optimizations off: compiling the interpreted kernels
    dominates the test time, running them is quick."""
    return jax.jit(f).trace(*args).lower().compile(
        compiler_options={"xla_backend_optimization_level": 0})


def _run_reference(case: Case, qkv, weights, segs):
    """The reference in float64 on the same (possibly bf16-rounded) inputs."""
    with jax.enable_x64(True):
        qkv = [jnp.asarray(np.asarray(x, np.float64)) for x in qkv]
        weights = [jnp.asarray(np.asarray(w, np.float64)) for w in weights]

        def f(q, k, v, w_out, w_lse, q_seg, kv_seg):
            def attn(q, k, v):
                return attention_reference(
                    q, k, v, causal=case.causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                    q_offset=case.q_offset, kv_offset=case.kv_offset, window=case.window)
            return jax.value_and_grad(_loss, argnums=(1, 2, 3), has_aux=True)(
                attn, q, k, v, w_out, w_lse)

        args = (*qkv, *weights, *segs)
        (_, (out, lse)), grads = _compile(f, args)(*args)
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def _assert_close(name: str, got, want, rtol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), f"{name}: -inf rows differ"
    got, want = np.where(np.isinf(want), 0.0, got), np.where(np.isinf(want), 0.0, want)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    scale = np.max(np.abs(want))
    assert scale > 0, f"{name}: the reference is all zeros, the case tests nothing"
    err = np.max(np.abs(got - want)) / scale
    assert err <= rtol, f"{name}: max error {err:.2e} of max |ref| (tolerance {rtol:.0e})"


def check(case: Case, seed: int = 0) -> None:
    qkv, weights, segs = _inputs(case, seed)
    out, lse, grads = _run_kernel(case, qkv, weights, segs)
    r_out, r_lse, r_grads = _run_reference(case, qkv, weights, segs)
    assert out.dtype == qkv[0].dtype and lse.dtype == jnp.float32
    assert out.shape == qkv[0].shape and lse.shape == (case.batch, case.heads, case.t)
    rtol = 1e-5 if case.dtype == "float32" else 2e-2
    _assert_close("out", out, r_out, rtol)
    _assert_close("lse", lse, r_lse, rtol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.dtype == qkv[0].dtype
        _assert_close(name, g, r, rtol)


# GQA ratios 1/2/4/8, head_dim 64 and 128, odd and unequal lengths, segments, offsets.
@pytest.mark.parametrize("case", [
    Case(t=37, s=37, heads=2, kv_heads=2, head_dim=64, causal=False),
    Case(t=33, s=33, heads=4, kv_heads=2, head_dim=128, segments=True),
    # a ring step: keys ahead of some queries (those rows see nothing: out 0, lse -inf)
    Case(t=24, s=45, heads=4, kv_heads=1, head_dim=64, q_offset=30, kv_offset=41),
    Case(t=29, s=21, heads=8, kv_heads=1, head_dim=64, segments=True, q_offset=7,
         kv_offset=3, causal=False),
    Case(t=40, s=40, heads=4, kv_heads=2, head_dim=128, segments=True, dtype="bfloat16"),
    # sliding windows: inside one block, across blocks with segments, a ring block's offsets
    Case(t=64, s=64, heads=2, kv_heads=1, head_dim=64, window=5, batch=1),
    Case(t=70, s=70, heads=4, kv_heads=2, head_dim=64, window=23, segments=True, batch=1),
    Case(t=32, s=48, heads=2, kv_heads=2, head_dim=64, window=37, q_offset=40, kv_offset=8,
         batch=1),
], ids=["mha-noncausal", "gqa2-segments-d128", "gqa4-offsets-empty-rows",
        "gqa8-segments-offsets-noncausal", "bf16-gqa2-segments", "window-in-block",
        "window-across-blocks-segments", "window-offsets"])
def test_triton_kernel_matches_reference(case):
    check(case)


def test_default_block_sizes_and_padded_head_dim():
    # Blocks shrink to the sequence (one partial block); head_dim 80 pads to 128 inside.
    check(Case(t=50, s=50, heads=2, kv_heads=1, head_dim=80, blocks=None, batch=1))


@pytest.mark.parametrize("case", [
    Case(t=37, s=45, heads=4, kv_heads=1, head_dim=128, segments=True, q_offset=12,
         kv_offset=4, backend="mosaic_tpu"),
    Case(t=32, s=32, heads=2, kv_heads=2, head_dim=64, causal=False, backend="mosaic_tpu",
         dtype="bfloat16", batch=1),
    Case(t=64, s=64, heads=2, kv_heads=1, head_dim=64, window=21, backend="mosaic_tpu", batch=1),
], ids=["gqa4-segments-offsets", "bf16-noncausal", "window"])
def test_tpu_kernel_matches_reference(case):
    check(case)


@settings(derandomize=True, max_examples=3, deadline=None, database=None)
@given(t=st.integers(1, 40), s=st.integers(1, 40), ratio=st.sampled_from([1, 2, 4, 8]),
       head_dim=st.sampled_from([64, 128]), causal=st.booleans(), segments=st.booleans(),
       kv_offset=st.integers(0, 20), ahead=st.integers(0, 20),
       block=st.sampled_from([16, 32]))
def test_drawn_shapes(t, s, ratio, head_dim, causal, segments, kv_offset, ahead, block):
    # q_offset >= kv_offset and both segment ids start at 0: query 0 sees key 0, so no
    # draw masks everything (rows that see nothing are still drawn).
    check(Case(t=t, s=s, heads=ratio, kv_heads=1, head_dim=head_dim, causal=causal,
               segments=segments, q_offset=kv_offset + ahead, kv_offset=kv_offset, batch=1,
               blocks=BlockSizes(block, block, block, block, block, block)),
          seed=t * 41 + s)


def test_window_skips_key_blocks():
    """The window's saving, in the loop bounds the GPU kernels run: a query block far from
    the start visits only the key blocks its window reaches (forward and dq), and a key
    block is visited only by the query blocks within a window of it (dk/dv)."""
    from pallas_kernels.flash_attention.gpu import kv_block_range, q_block_range

    i32 = jnp.int32
    # queries 96..111 (block 6 of 16), window 20: keys 77..111, i.e. key blocks 4..6 of 16
    start, mid, lo, hi = kv_block_range(i32(96), i32(111), i32(0), i32(20), causal=True,
                                        segmented=False, kv_len=256, block_kv=16, num_kv_blocks=16)
    assert (int(start), int(hi)) == (4, 7)  # blocks 0..3 skipped
    assert int(start) <= int(mid) <= int(lo) <= int(hi)
    full = kv_block_range(i32(96), i32(111), i32(0), None, causal=True, segmented=False,
                          kv_len=256, block_kv=16, num_kv_blocks=16)
    assert int(full[0]) == 0 and int(full[3]) == 7  # without a window every earlier block runs
    # keys 16..31 (block 1), window 20: queries 16..50, i.e. query blocks 1..3 of 16
    lo, full_q, near, end = q_block_range(i32(16), i32(31), i32(0), i32(20), causal=True,
                                          segmented=False, block_q=16, num_q_blocks=16)
    assert (int(lo), int(end)) == (1, 4)
    assert int(lo) <= int(full_q) <= int(near) <= int(end)


def test_reference_matches_numpy_loop():
    """The masking rule, GQA mapping, empty rows and lse, written out the slow way."""
    rng = np.random.default_rng(0)
    b, t, s, h, kvh, d = 2, 7, 9, 4, 2, 8
    q, k, v = (rng.standard_normal(shape) for shape in
               [(b, t, h, d), (b, s, kvh, d), (b, s, kvh, d)])
    q_seg = np.array([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5]])
    kv_seg = np.array([[0, 1, 1, 1, 2, 2, 2, 2, 3], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    q_off, kv_off, scale = 2, 4, 0.3
    out, lse = np.zeros((b, t, h, d)), np.full((b, h, t), -np.inf)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(s) if kv_off + j <= q_off + i
                        and q_seg[bi, i] == kv_seg[bi, j]]
                if not keys:
                    continue
                logits = np.array([q[bi, i, hi] @ k[bi, j, hi // (h // kvh)] * scale
                                   for j in keys])
                lse[bi, hi, i] = np.log(np.sum(np.exp(logits)))
                p = np.exp(logits - lse[bi, hi, i])
                out[bi, i, hi] = sum(pj * v[bi, j, hi // (h // kvh)] for pj, j in zip(p, keys))
    assert np.isneginf(lse).any() and np.isfinite(lse).any()
    with jax.enable_x64(True):
        r_out, r_lse = attention_reference(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True,
            q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg),
            q_offset=q_off, kv_offset=kv_off, sm_scale=scale)
    np.testing.assert_allclose(np.asarray(r_out), out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(np.asarray(r_lse)), np.isneginf(lse))
    np.testing.assert_allclose(np.where(np.isinf(lse), 0, r_lse), np.where(np.isinf(lse), 0, lse),
                               rtol=1e-12)


def test_xla_backend_is_the_reference_with_finite_gradients():
    case = Case(t=20, s=20, heads=4, kv_heads=2, head_dim=64, segments=True, q_offset=0,
                kv_offset=6)
    (q, k, v), weights, segs = _inputs(case, seed=3)

    def attn(q, k, v):
        return flash_attention(q, k, v, causal=True, q_segment_ids=segs[0],
                               kv_segment_ids=segs[1], kv_offset=6, return_lse=True,
                               backend="xla")

    def f(q, k, v, w_out, w_lse):
        return jax.value_and_grad(_loss, argnums=(1, 2, 3), has_aux=True)(
            attn, q, k, v, w_out, w_lse)

    args = (q, k, v, *weights)
    (_, (out, lse)), grads = _compile(f, args)(*args)
    r_out, r_lse, r_grads = _run_reference(case, (q, k, v), weights, segs)
    _assert_close("out", out, r_out, 1e-5)
    _assert_close("lse", lse, r_lse, 1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        _assert_close(name, g, r, 1e-5)


def _primitives(fn, *args) -> set[str]:
    return set(re.findall(r"\b(pallas_call|custom_vjp_call)\b", str(jax.make_jaxpr(fn)(*args))))


def test_backend_selection():
    x = jnp.ones((1, 16, 2, 64))
    assert "pallas_call" in _primitives(lambda x: flash_attention(x, x, x, interpret=True), x)
    assert "pallas_call" in _primitives(
        lambda x: flash_attention(x, x, x, backend="mosaic_tpu", interpret=True), x)
    assert "pallas_call" not in _primitives(lambda x: flash_attention(x, x, x), x)  # auto=xla
    with pytest.raises(ValueError, match="has none"):
        flash_attention(x, x, x, backend="xla", interpret=True)
    with pytest.raises(ValueError, match="divisible"):
        flash_attention(jnp.ones((1, 16, 3, 64)), x, x)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)


@pytest.mark.parametrize("platform,backend,marker", [
    ("cuda", "triton", "__gpu$xla.gpu.triton"),
    ("tpu", "mosaic_tpu", "tpu_custom_call"),
])
def test_lowering(platform, backend, marker):
    """Forward and backward kernels lower for the accelerator (not run here)."""
    def train_step(q, k, v, seg, q_offset, kv_offset):
        def loss(q, k, v):
            out, lse = flash_attention(q, k, v, causal=True, q_segment_ids=seg,
                                       q_offset=q_offset, kv_offset=kv_offset,
                                       return_lse=True, backend=backend)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for t, h, kvh, d, dtype, seg in [(1000, 8, 2, 128, jnp.bfloat16, True),
                                     (512, 4, 4, 64, jnp.float32, False)]:
        q = jax.ShapeDtypeStruct((2, t, h, d), dtype)
        k = jax.ShapeDtypeStruct((2, t, kvh, d), dtype)
        seg_ids = jax.ShapeDtypeStruct((2, t), jnp.int32) if seg else None
        offset = jax.ShapeDtypeStruct((), jnp.int32)
        traced = jax.jit(train_step).trace(q, k, k, seg_ids, offset, offset)
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert text.count(marker) == 3, (platform, t, text.count(marker))  # fwd, dq, dkv
