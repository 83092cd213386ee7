"""The one attention entry point of the model, dispatching to an implementation.

`attention(q, k, v, ...)` takes q [B, T, H, D] and k, v [B, S, KV, D] (grouped-query:
H divisible by KV; query head h reads kv head h // (H // KV)). Keys and queries carry
their own segment ids and positions, so all-gathered K/V whose tokens differ from the
local queries need no reordering.

Masking: query i may attend key j iff both lie in the same segment, the segment is not
0 (padding), when causal, position[j] <= position[i], and with a sliding `window` W,
position[i] - position[j] < W (the query and the W - 1 tokens before it). A window is
an int or a traced int scalar (one per scanned layer), <= 0 meaning none; `softcap` c
turns scores into c * tanh(scores / c) before the mask (Gemma 2). Causality comes from the
positions, never from array indices, so reordered layouts (zigzag ring shards) stay
correct. A query with no visible key (padding) outputs zeros in every implementation.

Under sequence parallelism (`efficient_train.parallel.sequence`) the call goes to the
configured mode: `all_gather` and `ulysses` bring the other devices' tokens in and run
the local implementation below (all of them work there); `ring` computes block by
block with the flash kernel's log-sum-exp: 'pallas' runs the Pallas kernel, any other
impl its plain-JAX backend (jax's cuDNN call returns no log-sum-exp). Ring masks chunk
pairs by their place in the zigzag layout, equal to the position mask for packed rows.
Every mode takes the window; soft-capping works wherever the local computation is
'xla' (cuDNN and the Pallas kernel do not compute it, and say so).

Implementations:
- 'xla': plain jnp; scores and softmax in fp32 (matmuls accumulate in fp32), no repeat
  of kv heads (queries are grouped per kv head instead).
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')` with the segment
  and position mask passed as a boolean mask (jax's public API has no segment ids).
  When the keys are the queries' own tokens, `is_causal` is set too so cuDNN can skip
  the upper triangle; that relies on positions increasing along the sequence within a
  segment, which packing guarantees. A window rides in the mask. GPU only, bf16/fp16
  only, no soft-capping.
- 'pallas': `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU, the Pallas
  interpreter on CPU); causality from token order, so it needs packed positions to
  rise within a document (they do); a window skips the key blocks behind it. Not split
  by the compiler: use it with mesh.tensor=1. No soft-capping.
- 'auto': 'cudnn' on an NVIDIA GPU when dtype and shapes allow it (and no soft-cap),
  else 'xla'.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficient_train.models import kv_cache
from efficient_train.models.choices import ATTENTION_IMPLS
from efficient_train.parallel import all_gather, ring, ulysses
from efficient_train.parallel import sequence as sequence_parallel
from pallas_kernels.flash_attention.reference import effective_window

Window = int | jax.Array | None


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    positions: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    causal: bool = True,
    impl: str = "auto",
    scale: float | None = None,
    window: Window = None,
    softcap: float | None = None,
) -> jax.Array:
    """Masked multi-head attention; returns [B, T, H, D] in q's dtype.

    segment_ids, positions: int [B, T] of the queries. kv_segment_ids, kv_positions:
    int [B, S] of the keys, defaulting to the queries' (self-attention on the same
    tokens). positions default to array indices. scale defaults to 1/sqrt(D).
    window (causal only) and softcap: see the module docstring.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    if softcap is not None and impl in ("cudnn", "pallas"):
        raise ValueError(f"attention impl {impl!r} does not soft-cap scores (model.attn_softcap); use 'xla' or 'auto'")
    cache = kv_cache.active()
    if cache is not None:  # decoding (generate/): this layer's keys and values join its KV cache
        if positions is None:
            raise ValueError("decoding with a KV cache needs the new tokens' positions")
        local = functools.partial(_local_attention, causal=causal, impl="xla" if impl == "pallas" else impl,
                                  scale=scale, window=window,
                                  softcap=softcap)  # the Pallas kernel's causal mask assumes the keys are the queries
        return cache.attend(q, k, v, segment_ids=segment_ids, positions=positions, local=local)
    sp = sequence_parallel.active()
    if sp is None:
        return _local_attention(q, k, v, segment_ids=segment_ids, positions=positions,
                                kv_segment_ids=kv_segment_ids, kv_positions=kv_positions, q_offset=0,
                                causal=causal, impl=impl, scale=scale, window=window, softcap=softcap)
    if kv_segment_ids is not None or kv_positions is not None:
        raise ValueError("under sequence parallelism the keys are the queries' own tokens")
    if positions is None:
        raise ValueError("positions are required under sequence parallelism (array indices are local)")
    if sp.mode == "ring":
        backend, interpret = _ring_block_backend(impl)
        out = ring.attention(q, k, v, segment_ids, axis=sp.axis, causal=causal, scale=scale,
                             backend=backend, interpret=interpret, window=window, softcap=softcap)
        return jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))
    local = functools.partial(_local_attention, causal=causal, impl=impl, scale=scale, window=window,
                              softcap=softcap)
    if sp.mode == "ulysses":
        return ulysses.attention(sp, q, k, v, segment_ids, positions, local)
    if sp.mode == "all_gather":
        return all_gather.attention(sp, q, k, v, segment_ids, positions, local)
    raise ValueError(f"sequence_parallel.mode: {sp.mode!r} is not one of 'ulysses', 'ring', 'all_gather'")


def _ring_block_backend(impl: str) -> tuple[str, bool]:
    """The flash_attention backend (and interpret flag) of ring attention's local blocks.

    'pallas' runs the Pallas kernel; every other impl the kernel's plain-JAX backend
    ('auto' never picks Pallas, which the compiler cannot split over mesh.tensor, and
    jax's cuDNN call returns no log-sum-exp).
    """
    if impl == "pallas":
        from pallas_kernels.backends import default_interpret

        return "auto", default_interpret()
    return "xla", False


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array,
                     positions: jax.Array | None, kv_segment_ids: jax.Array | None,
                     kv_positions: jax.Array | None, q_offset: int | jax.Array, causal: bool,
                     impl: str, scale: float | None, window: Window = None,
                     softcap: float | None = None) -> jax.Array:
    """Attention on one device (a `sequence_parallel.LocalAttention`)."""
    if impl == "pallas":
        return _pallas_attention(q, k, v, segment_ids, kv_segment_ids, q_offset, causal, scale, window)
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if k.shape != (b, s, kv, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, S, KV, D] matching q {q.shape}, got {k.shape}, {v.shape}")
    if h % kv:
        raise ValueError(f"query heads ({h}) must be divisible by kv heads ({kv})")
    same_tokens = kv_segment_ids is None and kv_positions is None
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    kv_positions = positions if kv_positions is None else kv_positions
    mask = _mask(segment_ids, positions, kv_segment_ids, kv_positions, causal, window)
    scale = d ** -0.5 if scale is None else scale

    if impl == "auto":
        impl = "cudnn" if softcap is None and _cudnn_supported(q, s) else "xla"
    if impl == "cudnn":
        if not _on_nvidia_gpu():
            raise ValueError(
                f"attention impl 'cudnn' needs an NVIDIA GPU backend, but jax's backend is "
                f"{jax.default_backend()!r}; use 'auto' or 'xla'")
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention impl 'cudnn' needs bf16 or fp16 inputs, got {q.dtype}")
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale,
            is_causal=causal and same_tokens, implementation="cudnn")
    else:
        out = _xla_attention(q, k, v, mask, scale, softcap)
    visible = jnp.any(mask, axis=-1)  # [B, T]: queries with at least one key
    return jnp.where(visible[:, :, None, None], out, jnp.zeros((), out.dtype))


def _pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      kv_segment_ids: jax.Array | None, q_offset: int | jax.Array,
                      causal: bool, scale: float | None, window: Window) -> jax.Array:
    """The Pallas flash kernel (pallas_kernels): never materializes a [T, S] mask.

    Its causal mask comes from token order plus offsets, which equals the position
    mask for packed rows (positions rise within a document). Under all-gather sequence
    parallelism the local queries start at `q_offset` = axis_index x T of the gathered
    keys. On the CPU the kernel runs in the Pallas interpreter.
    """
    from pallas_kernels import flash_attention
    from pallas_kernels.backends import default_interpret

    out = flash_attention(
        q, k, v, causal=causal, q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids if kv_segment_ids is None else kv_segment_ids,
        q_offset=q_offset, kv_offset=0, sm_scale=scale, window=window,
        interpret=default_interpret(),
    )
    assert isinstance(out, jax.Array)  # no log-sum-exp asked for
    # The kernel treats segment 0 like any other; padding queries output zeros here.
    return jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


def _mask(q_seg: jax.Array, q_pos: jax.Array, kv_seg: jax.Array, kv_pos: jax.Array,
          causal: bool, window: Window = None) -> jax.Array:
    """Boolean [B, T, S]: True where the query may attend the key."""
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    if causal:
        mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - kv_pos[:, None, :] < effective_window(jnp.asarray(window))
    return mask


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   scale: float, softcap: float | None = None) -> jax.Array:
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)  # head h = kv_head * group + g
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _on_nvidia_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda") and "nvidia" in jax.devices()[0].device_kind.lower()


def _cudnn_supported(q: jax.Array, kv_len: int) -> bool:
    """Conservative shape/dtype limits of cuDNN flash attention with a mask (as a bias)."""
    t, d = q.shape[1], q.shape[3]
    return (_on_nvidia_gpu() and q.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 128 and t % 2 == 0 and kv_len % 2 == 0)
