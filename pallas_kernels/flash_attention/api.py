"""`flash_attention`: the one entry point, with backend selection, padding and the VJP.

Owns what every kernel backend shares, so that gpu.py and tpu.py hold only kernels:
argument checks, picking the backend, block sizes, padding to whole blocks (sequence
lengths; head_dim to a power of two for Triton), and the `jax.custom_vjp` that joins a
backend's forward and backward kernels. The VJP takes the cotangent of the returned
log-sum-exp too: d lse / d scores = softmax, so it folds into the backward's row term
delta = rowsum(out * dout) - dlse and costs nothing extra in the kernels. A raw
`pallas_call` cannot be differentiated, hence the custom_vjp around the kernels; the
'xla' backend is the plain reference and is differentiated by ordinary autodiff.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.backends import resolve_backend
from pallas_kernels.flash_attention import gpu, reference, tpu

_MIN_BLOCK = 16  # Triton's smallest dot tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two) per kernel, and Triton launch parameters.

    block_q/block_kv: forward; *_dq: the dq kernel; *_dkv: the dk/dv kernel. Blocks are
    shrunk to the (power-of-two rounded) sequence length for short inputs. num_warps and
    num_stages are used by the Triton backend only (forward, then backward).
    """
    block_q: int = 128
    block_kv: int = 128
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    @classmethod
    def default(cls, backend: str, head_dim: int, itemsize: int) -> BlockSizes:
        """Triton: the best of a sweep on an H100 (bf16, head_dim 128, 4k-8k causal), with
        smaller key tiles for wider rows (fp32 at head_dim 128 overflows shared memory
        at 128 x 128 with 3 stages). TPU: 128 everywhere (untuned)."""
        if backend == "mosaic_tpu":
            return cls(128, 128, 128, 128, 128, 128)
        wide = head_dim * itemsize > 256
        return cls(block_kv=64 if wide else 128, num_stages=2 if wide else 3,
                   num_warps=4 if head_dim <= 64 else 8)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            n = getattr(self, f.name)
            if f.name.startswith("block") and (n < 1 or n & (n - 1)):
                raise ValueError(f"BlockSizes.{f.name} must be a power of two, got {n}")


def flash_attention(
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
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention softmax(q k^T * sm_scale + mask) v, memory-efficient and differentiable.

    q [B, T, H, D]; k, v [B, S, KV, D] with H divisible by KV (query head h reads kv head
    h // (H // KV)). Returns out [B, T, H, D] in q's dtype, and with return_lse also the
    log-sum-exp of the scaled, masked scores, lse [B, H, T] float32 (differentiable:
    ring attention merges partial results through it).

    Masking: query i sits at global position q_offset + i, key j at kv_offset + j; with
    causal, a query sees the keys at positions <= its own. Offsets may be traced int
    scalars. With segment ids (int [B, T] and [B, S]; kv_segment_ids defaults to
    q_segment_ids when S == T), queries see only keys of an equal id. A query that sees
    no key gets out = 0 and lse = -inf, and passes no gradient.

    sm_scale defaults to D ** -0.5. backend: 'triton' (NVIDIA GPU), 'mosaic_tpu' (TPU),
    'xla' (plain JAX reference), 'auto' (triton on an NVIDIA GPU, mosaic_tpu on a TPU, xla
    otherwise). interpret=True runs the Pallas kernel (Triton's unless backend is
    'mosaic_tpu') in the Pallas interpreter on any platform; it never falls back to xla.
    """
    b, t, h, d = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, S, KV, D] matching q {q.shape}, "
                         f"got {k.shape} and {v.shape}")
    s, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be divisible by kv heads ({kvh})")
    if kv_segment_ids is None and q_segment_ids is not None and s == t:
        kv_segment_ids = q_segment_ids
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and kv_segment_ids is not None and (q_segment_ids.shape != (b, t)
                                                                     or kv_segment_ids.shape != (b, s)):
        raise ValueError(f"segment ids must be [B, T] = {(b, t)} and [B, S] = {(b, s)}, got "
                         f"{q_segment_ids.shape} and {kv_segment_ids.shape}")
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal=True")
    backend = resolve_backend(backend, interpret)
    if softcap is not None and backend != "xla":
        raise ValueError(f"softcap is computed by the 'xla' backend only, not {backend!r}")
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    # offsets[2] is the window; it is read only when `windowed`.
    offsets = jnp.stack([jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_offset, jnp.int32),
                         jnp.asarray(0 if window is None else window, jnp.int32)])
    windowed = window is not None
    if backend == "xla":
        out, lse = _reference(q, k, v, q_segment_ids, kv_segment_ids, offsets, causal=causal,
                              scale=scale, windowed=windowed, softcap=softcap)
    else:
        blocks = block_sizes or BlockSizes.default(backend, d, q.dtype.itemsize)
        out, lse = _pallas(q, k, v, q_segment_ids, kv_segment_ids, offsets, causal=causal,
                           scale=scale, blocks=blocks, backend=backend, interpret=interpret,
                           windowed=windowed)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("causal", "scale", "windowed", "softcap"))
def _reference(q, k, v, q_seg, kv_seg, offsets, *, causal: bool, scale: float, windowed: bool,
               softcap: float | None):
    return reference.attention_reference(
        q, k, v, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        q_offset=offsets[0], kv_offset=offsets[1], sm_scale=scale,
        window=offsets[2] if windowed else None, softcap=softcap)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one kernel call (the custom_vjp's non-diff argument)."""
    backend: str
    causal: bool
    windowed: bool  # offsets[2] holds a sliding window
    scale: float
    kv_len: int
    blocks: BlockSizes
    interpret: bool


def _fit(block: int, length: int) -> int:
    """The block for a sequence of this length: at most its power-of-two ceiling."""
    return min(block, max(_MIN_BLOCK, 1 << (length - 1).bit_length()))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.partial(jax.jit, static_argnames=("causal", "scale", "blocks", "backend",
                                             "interpret", "windowed"))
def _pallas(q, k, v, q_seg, kv_seg, offsets, *, causal: bool, scale: float,
            blocks: BlockSizes, backend: str, interpret: bool, windowed: bool):
    t, d = q.shape[1], q.shape[3]
    s = k.shape[1]
    fit = dataclasses.replace(
        blocks,
        block_q=_fit(blocks.block_q, t), block_q_dq=_fit(blocks.block_q_dq, t),
        block_q_dkv=_fit(blocks.block_q_dkv, t), block_kv=_fit(blocks.block_kv, s),
        block_kv_dq=_fit(blocks.block_kv_dq, s), block_kv_dkv=_fit(blocks.block_kv_dkv, s))
    # Powers of two: the largest block is a multiple of the others.
    t_pad = _round_up(t, max(fit.block_q, fit.block_q_dq, fit.block_q_dkv))
    s_pad = _round_up(s, max(fit.block_kv, fit.block_kv_dq, fit.block_kv_dkv))
    d_pad = max(_MIN_BLOCK, 1 << (d - 1).bit_length()) if backend == "triton" else d

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))

    if q_seg is not None:
        q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
        kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, s_pad - s)))
    static = _Static(backend, causal, windowed, scale, s, fit, interpret)
    out, lse = _flash(static, pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), q_seg, kv_seg,
                      offsets)
    return out[:, :t, :, :d], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, q_seg, kv_seg, offsets):
    return _forward(static, q, k, v, q_seg, kv_seg, offsets)


def _forward(static: _Static, q, k, v, q_seg, kv_seg, offsets):
    bs = static.blocks
    if static.backend == "mosaic_tpu":
        return tpu.forward(q, k, v, q_seg, kv_seg, offsets, scale=static.scale,
                           causal=static.causal, windowed=static.windowed, kv_len=static.kv_len, block_q=bs.block_q,
                           block_kv=bs.block_kv, interpret=static.interpret)
    return gpu.forward(q, k, v, q_seg, kv_seg, offsets, scale=static.scale,
                       causal=static.causal, windowed=static.windowed, kv_len=static.kv_len, block_q=bs.block_q,
                       block_kv=bs.block_kv, num_warps=bs.num_warps,
                       num_stages=bs.num_stages, interpret=static.interpret)


def _flash_fwd(static: _Static, q, k, v, q_seg, kv_seg, offsets):
    out, lse = _forward(static, q, k, v, q_seg, kv_seg, offsets)
    return (out, lse), (q, k, v, q_seg, kv_seg, offsets, out, lse)


def _flash_bwd(static: _Static, residuals, cotangents):
    q, k, v, q_seg, kv_seg, offsets, out, lse = residuals
    dout, dlse = cotangents
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    delta = delta - dlse
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows that see nothing: p = exp(-inf)
    bs = static.blocks
    kwargs: dict[str, Any] = dict(scale=static.scale, causal=static.causal, windowed=static.windowed,
                  kv_len=static.kv_len,
                  block_q_dq=bs.block_q_dq, block_kv_dq=bs.block_kv_dq,
                  block_q_dkv=bs.block_q_dkv, block_kv_dkv=bs.block_kv_dkv,
                  interpret=static.interpret)
    if static.backend == "mosaic_tpu":
        dq, dk, dv = tpu.backward(q, k, v, q_seg, kv_seg, offsets, dout, lse, delta, **kwargs)
    else:
        dq, dk, dv = gpu.backward(q, k, v, q_seg, kv_seg, offsets, dout, lse, delta,
                                  num_warps=bs.num_warps_bwd, num_stages=bs.num_stages_bwd,
                                  **kwargs)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
