"""Plain-JAX attention: the semantics every flash-attention backend must reproduce.

Owns the masking rule (`visible`, shared with the kernels so that there is one
definition of who sees whom) and `attention_reference`, the 'xla' backend and the
oracle of the tests. It materializes the full [T, S] score matrix on purpose: no
blocking, no online softmax, nothing that could hide the same bug as a kernel. It is
differentiated by ordinary autodiff.

Semantics (shared by all backends):
- query i has global position q_offset + i, key j has kv_offset + j; with causal,
  query i sees key j iff kv_offset + j <= q_offset + i;
- with a sliding `window` W (causal only), query i sees key j only if
  (q_offset + i) - (kv_offset + j) < W: itself and the W - 1 keys before it, the rule of
  Hugging Face's sliding-window masks; a window <= 0 (traced: one layer of a scan whose
  other layers are windowed) means no window;
- with segment ids, a query sees only keys of an equal segment id;
- grouped-query attention: query head h reads kv head h // (H // KV);
- a query row that sees no key gets output 0 and log-sum-exp -inf (its gradients are 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NO_WINDOW = 2**30  # a window no sequence reaches: what a window <= 0 becomes


def effective_window(window: jax.Array) -> jax.Array:
    """The window as the kernels compare it: a value <= 0 (no window) becomes NO_WINDOW."""
    return jnp.where(window > 0, window, NO_WINDOW)


def visible(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None,
            kv_seg: jax.Array | None, *, causal: bool,
            window: jax.Array | None = None) -> jax.Array | None:
    """Boolean mask, True where a query may attend a key; None if nothing is masked.

    Arguments broadcast against each other (e.g. q_pos [T, 1] against kv_pos [1, S], or
    transposed). Positions are global (offsets included). `window`, when given, is an
    effective window (`effective_window`): keys more than window - 1 positions back
    are hidden.
    """
    mask = None
    if causal:
        mask = kv_pos <= q_pos
    if window is not None:
        near = q_pos - kv_pos < window
        mask = near if mask is None else mask & near
    if q_seg is not None and kv_seg is not None:  # both or neither
        same = jnp.equal(q_seg, kv_seg)
        mask = same if mask is None else mask & same
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    sm_scale: float | None = None,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns (out [B, T, H, D] in q's dtype, lse [B, H, T] in float32 or wider).

    Computes in float32, or float64 when the inputs are float64 (the tests' oracle).
    softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2).
    """
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    scale = d ** -0.5 if sm_scale is None else sm_scale
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(dtype).reshape(b, t, kvh, group, d)  # head h = kv_head * group + g
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(dtype)) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)

    q_pos = (q_offset + jnp.arange(t))[:, None]
    kv_pos = (kv_offset + jnp.arange(s))[None, :]
    q_seg = None if q_segment_ids is None else q_segment_ids[:, None, None, :, None]
    kv_seg = None if kv_segment_ids is None else kv_segment_ids[:, None, None, None, :]
    mask = visible(q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                   window=None if window is None else effective_window(jnp.asarray(window)))
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)

    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # empty rows: exp(-inf) = 0
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p / safe, v.astype(dtype))
    lse = jnp.where(seen, row_max + jnp.log(safe), -jnp.inf)[..., 0]  # [B, KV, G, T]
    return out.reshape(b, t, h, d).astype(q.dtype), lse.reshape(b, h, t)
