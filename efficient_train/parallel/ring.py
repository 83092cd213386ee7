"""Ring attention over the zigzag layout: K/V blocks travel around the axis, S steps.

Layout (`layout.ZIGZAG`, applied once by the data pipeline): the sequence is cut into
2S chunks of C = T/(2S) tokens; device i holds chunk i then chunk 2S-1-i. At step j
device i holds the K/V block of device src = i - j (mod S), sent one hop along the
ring by `ppermute` while the previous block is being computed, and merges the
block's partial result into its running one with the log-sum-exp:
out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b).

Causal balance. Because the chunks' places in token order are known, every chunk pair
is either wholly in the past (computed without a causal mask), wholly in the future
(skipped) or diagonal (causal); within a document positions rise with token order (the
packer guarantees it; cuDNN's `is_causal` and the Pallas path rely on the same), so this
equals the position mask. Step 0 (own block): pairs (i,i) and (2S-1-i,2S-1-i)
causal, (2S-1-i, i) whole. Step j > 0: if src < i, both our chunks see chunk src
and neither sees 2S-1-src; if src > i, our chunk i sees nothing and 2S-1-i sees both.
Either way two C x C pairs, computed in one kernel call with the batch doubled (the
second pair chosen by a select on src < i, not a branch). Every device does the same
work at every step. Segment ids travel with K/V; positions are not needed.

Sliding windows. A window hides keys by their distance, which a "wholly in the past"
pair does not settle, so with a window every pair is computed causally with its chunks'
true offsets (chunk c starts at token c x C) and the window, one kernel call per pair
(the two pairs of a step differ in offset, so they are not stacked); pairs the window
puts out of reach come out empty (lse -inf) and the kernel skips their blocks.

Local blocks are `pallas_kernels.flash_attention(..., return_lse=True)` with the
backend the dispatch picks: the Pallas kernel (interpreted on CPU) or its plain-JAX
'xla' backend, which materializes one block's C x C scores at a time.

Backward (custom_vjp, not autodiff of the loop): residuals are q, k, v, the output and
its log-sum-exp L only. The ring runs again: K/V travel as in the forward, together
with fp32 dK/dV accumulators that every device adds its contribution to; after S
steps (one extra hop for the accumulators) they are back at their owners. A block's
gradient is the block's own VJP with the cotangents the merge implies: with
w = exp(lse_b - L), d out_b = w dO and d lse_b = w (rowsum(dO out_b) - rowsum(dO O)),
which makes the kernel's backward use the global softmax exp(s - L). The block's VJP
reruns its forward (flash_attention exposes no backward that takes an outside L),
one extra block forward per step, traded for not storing any block's residuals.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import flash_attention


@dataclasses.dataclass(frozen=True)
class RingSpec:
    """Everything static about one ring attention call."""

    axis: str
    size: int
    causal: bool
    scale: float
    backend: str  # flash_attention backend of the local blocks
    interpret: bool
    windowed: bool = False  # a sliding window travels as the traced `window` argument
    softcap: float | None = None  # soft-capped scores ('xla' blocks only)


class Partial(NamedTuple):
    """Attention over the keys seen so far: normalized out [B, T, H, D] fp32, lse [B, H, T]."""

    out: jax.Array
    lse: jax.Array


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, axis: str,
              causal: bool, scale: float | None = None, backend: str = "auto",
              interpret: bool = False, window: int | jax.Array | None = None,
              softcap: float | None = None) -> jax.Array:
    """Zigzag-ring attention inside a shard_map manual over `axis`.

    q [B, T/S, H, D], k, v [B, T/S, KV, D], segment_ids [B, T/S]: this device's two
    zigzag chunks. Returns out [B, T/S, H, D] in q's dtype. Segment id 0 is an ordinary
    id here (the dispatch zeroes padding queries afterwards). window: a sliding window
    (causal only; traced allowed, <= 0 meaning none); softcap: soft-capped scores.
    """
    size = jax.lax.axis_size(axis)
    if causal and q.shape[1] % 2:
        raise ValueError(f"ring attention: the local sequence ({q.shape[1]}) must hold two equal zigzag "
                         f"chunks; make data.seq_len divisible by 2 x mesh.sequence = {2 * size}")
    if window is not None and not causal:
        raise ValueError("ring attention: a sliding window needs causal attention")
    spec = RingSpec(axis, size, causal, float(q.shape[3] ** -0.5 if scale is None else scale),
                    backend, interpret, window is not None, softcap)
    return _ring(spec, q, k, v, segment_ids, jnp.asarray(0 if window is None else window, jnp.int32))


def _block(spec: RingSpec, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array,
           kv_seg: jax.Array, causal: bool, window: jax.Array | None = None,
           q_offset: int | jax.Array = 0, kv_offset: int | jax.Array = 0) -> Partial:
    out, lse = flash_attention(q, k, v, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                               q_offset=q_offset, kv_offset=kv_offset, sm_scale=spec.scale,
                               window=window if spec.windowed else None, softcap=spec.softcap,
                               return_lse=True, backend=spec.backend, interpret=spec.interpret)
    return Partial(out.astype(jnp.float32), lse.astype(jnp.float32))


def _rows(x: jax.Array) -> jax.Array:
    """[B, H, T] -> [B, T, H, 1], to scale outputs row by row."""
    return jnp.swapaxes(x, 1, 2)[..., None]


def _merge(a: Partial, b: Partial) -> Partial:
    """Attention over the union of two disjoint key sets; rows that saw nothing stay -inf."""
    ref = jax.lax.stop_gradient(jnp.maximum(a.lse, b.lse))  # the result does not depend on it
    ref = jnp.where(jnp.isfinite(ref), ref, 0.0)
    wa, wb = jnp.exp(a.lse - ref), jnp.exp(b.lse - ref)
    total = wa + wb
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    out = _rows(wa / safe) * a.out + _rows(wb / safe) * b.out
    return Partial(out, jnp.where(seen, ref + jnp.log(safe), -jnp.inf))


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = x.shape[1] // 2
    return x[:, :c], x[:, c:]


def _stack(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.concatenate([a, b], axis=0)


def _split(p: Partial) -> tuple[Partial, Partial]:
    b = p.out.shape[0] // 2
    return Partial(p.out[:b], p.lse[:b]), Partial(p.out[b:], p.lse[b:])


def _join(first: Partial, second: Partial) -> Partial:
    return Partial(jnp.concatenate([first.out, second.out], axis=1),
                   jnp.concatenate([first.lse, second.lse], axis=2))


def _own_block(spec: RingSpec, q: jax.Array, seg: jax.Array, k: jax.Array, v: jax.Array,
               window: jax.Array) -> Partial:
    """Step 0: this device's queries against its own keys."""
    if not spec.causal:
        return _block(spec, q, k, v, seg, seg, causal=False)
    (q0, q1), (k0, k1), (v0, v1), (s0, s1) = map(_halves, (q, k, v, seg))
    # Both diagonal pairs have offset difference 0, so they stack even with a window.
    diagonal = _block(spec, _stack(q0, q1), _stack(k0, k1), _stack(v0, v1), _stack(s0, s1),
                      _stack(s0, s1), causal=True, window=window)
    first, second = _split(diagonal)
    if spec.windowed:
        me, c = jax.lax.axis_index(spec.axis), q0.shape[1]
        cross = _block(spec, q1, k0, v0, s1, s0, causal=True, window=window,
                       q_offset=(2 * spec.size - 1 - me) * c, kv_offset=me * c)
    else:
        cross = _block(spec, q1, k0, v0, s1, s0, causal=False)
    return _join(first, _merge(second, cross))


def _other_block(spec: RingSpec, q: jax.Array, seg: jax.Array, k: jax.Array, v: jax.Array,
                kv_seg: jax.Array, src: jax.Array | int, me: jax.Array, window: jax.Array) -> Partial:
    """Step j > 0: this device's (`me`) queries against the keys of device `src` != me."""
    if not spec.causal:
        return _block(spec, q, k, v, seg, kv_seg, causal=False)
    (q0, q1), (k0, k1), (v0, v1), (s0, s1), (t0, t1) = map(_halves, (q, k, v, seg, kv_seg))
    earlier = src < me  # src's first chunk precedes both of ours; else our second follows both of src's
    pick = lambda when_earlier, otherwise: jnp.where(earlier, when_earlier, otherwise)
    # Pair one: our chunk 2S-1-me x src's chunk src. Pair two: (me, src) if earlier,
    # else (2S-1-me, 2S-1-src).
    if spec.windowed:  # each pair at its chunks' true offsets (see the module docstring)
        c, last = q0.shape[1], 2 * spec.size - 1
        one = _block(spec, q1, k0, v0, s1, t0, causal=True, window=window,
                     q_offset=(last - me) * c, kv_offset=src * c)
        two = _block(spec, pick(q0, q1), pick(k0, k1), pick(v0, v1), pick(s0, s1), pick(t0, t1),
                     causal=True, window=window, q_offset=pick(me, last - me) * c,
                     kv_offset=pick(src, last - src) * c)
    else:
        one, two = _split(_block(spec, _stack(q1, pick(q0, q1)), _stack(k0, pick(k0, k1)),
                                 _stack(v0, pick(v0, v1)), _stack(s1, pick(s0, s1)),
                                 _stack(t0, pick(t0, t1)), causal=False))
    first = Partial(jnp.where(earlier, two.out, 0.0), jnp.where(earlier, two.lse, -jnp.inf))
    second = _merge(one, Partial(two.out, jnp.where(earlier, -jnp.inf, two.lse)))
    return _join(first, second)


def _sender(spec: RingSpec) -> Callable:
    perm = [(d, (d + 1) % spec.size) for d in range(spec.size)]
    return functools.partial(jax.lax.ppermute, axis_name=spec.axis, perm=perm)


def _forward(spec: RingSpec, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array,
             window: jax.Array) -> Partial:
    acc = _own_block(spec, q, seg, k, v, window)
    if spec.size == 1:
        return acc
    me = jax.lax.axis_index(spec.axis)
    send = _sender(spec)

    def visit(acc: Partial, kv: tuple[jax.Array, jax.Array, jax.Array], j: jax.Array | int) -> Partial:
        kv_k, kv_v, kv_seg = kv
        return _merge(acc, _other_block(spec, q, seg, kv_k, kv_v, kv_seg, src=(me - j) % spec.size, me=me,
                                        window=window))

    def step(carry: tuple, j: jax.Array) -> tuple:
        acc, kv = carry
        incoming = send(kv)  # in flight while this block is computed
        return (visit(acc, kv, j), incoming), None

    (acc, kv), _ = jax.lax.scan(step, (acc, send((k, v, seg))), jnp.arange(1, spec.size - 1))
    return visit(acc, kv, spec.size - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec: RingSpec, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array,
          window: jax.Array) -> jax.Array:
    return _forward(spec, q, k, v, seg, window).out.astype(q.dtype)


def _ring_fwd(spec: RingSpec, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array,
              window: jax.Array) -> tuple:
    acc = _forward(spec, q, k, v, seg, window)
    out = acc.out.astype(q.dtype)
    return out, (q, k, v, seg, window, out, acc.lse)


def _ring_bwd(spec: RingSpec, residuals: tuple, dout: jax.Array) -> tuple:
    q, k, v, seg, window, out, lse = residuals
    dout = dout.astype(jnp.float32)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout)  # rowsum(dO O)
    lse_ref = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows with L = -inf have every lse_b = -inf

    def grads(block: Callable[[jax.Array, jax.Array, jax.Array], Partial], k: jax.Array,
              v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        part, pullback = jax.vjp(block, q, k, v)
        w = jnp.exp(part.lse - lse_ref)
        d_lse = w * (jnp.einsum("bthd,bthd->bht", part.out, dout) - delta)
        return tuple(g.astype(jnp.float32) for g in pullback(Partial(_rows(w) * dout, d_lse)))

    dq, dk, dv = grads(lambda q, k, v: _own_block(spec, q, seg, k, v, window), k, v)
    if spec.size > 1:
        me = jax.lax.axis_index(spec.axis)
        send = _sender(spec)

        def visit(dq: jax.Array, kv: tuple, dkv: tuple, j: jax.Array | int) -> tuple:
            kv_seg = kv[2]
            src = (me - j) % spec.size
            gq, gk, gv = grads(lambda q, k, v: _other_block(spec, q, seg, k, v, kv_seg, src, me, window),
                               kv[0], kv[1])
            return dq + gq, (dkv[0] + gk, dkv[1] + gv)

        def step(carry: tuple, j: jax.Array) -> tuple:
            dq, kv, dkv = carry
            incoming = send(kv)  # in flight while this block's gradients are computed
            dq, dkv = visit(dq, kv, dkv, j)
            return (dq, incoming, send(dkv)), None

        carry = (dq, send((k, v, seg)), send((dk, dv)))
        (dq, kv, dkv), _ = jax.lax.scan(step, carry, jnp.arange(1, spec.size - 1))
        dq, dkv = visit(dq, kv, dkv, spec.size - 1)
        dk, dv = send(dkv)  # the accumulators' last hop, home to their owners
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
