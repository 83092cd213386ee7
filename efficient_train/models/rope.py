"""Rotary position embeddings and their scalings, as transformers computes them.

Owns every rope_* field of `ModelConfig` and `local_rope_theta`: `frequencies` gives the
inverse frequencies of one layer kind (float32, fixed at trace time) for the scalings
transformers names `rope_type`: 'default', 'linear' (positions divided by the factor),
'llama3' (Llama 3.1: long wavelengths divided by the factor, a smooth blend between
low_freq_factor and high_freq_factor), 'yarn' (NTK-by-parts blend with a ramp between
beta_fast and beta_slow rotations, cos and sin scaled by the attention factor), and
'dynamic' (NTK: the base grows with the sequence once it passes the original context).
`angles` turns positions into the (cos, sin) tables `layers.apply_rope` uses.

Decisions:
- The arithmetic follows transformers' `modeling_rope_utils` step by step in float32,
  so imported models reproduce its logits to float32 rounding.
- 'dynamic' depends on the sequence: transformers takes the largest position id of
  the batch it is called on (and keeps a grown base between calls). Here the length
  is each row's largest position + 1 (taken over the whole row under sequence
  parallelism), so a row's logits do not depend on the other rows of its batch; for
  a batch of equally long rows the two agree.
- Windowed layers of a model with `local_rope_theta` (Gemma 3's local layers) use plain
  RoPE of that base; every other layer uses the scaled global RoPE.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_train.parallel import sequence as sequence_parallel


def _plain(head_dim: int, theta: float) -> np.ndarray:
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def _llama3(cfg: Any, inv_freq: np.ndarray) -> np.ndarray:
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    context = cfg.rope_original_context
    low_wavelen, high_wavelen = context / low, context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((context / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn(cfg: Any) -> np.ndarray:
    d, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    context = cfg.rope_original_context

    def correction_dim(rotations: float) -> float:
        return (d * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = np.float32(base) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = np.float32(1) - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def frequencies(cfg: Any, local: bool = False) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32, of the global layers or (`local`) of
    the windowed layers with their own plain RoPE. 'dynamic' gives its unscaled base."""
    if local:
        return _plain(cfg.head_dim, cfg.local_rope_theta)
    inv_freq = _plain(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_type == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        return _llama3(cfg, inv_freq)
    if cfg.rope_type == "yarn":
        return _yarn(cfg)
    return inv_freq


def attention_factor(cfg: Any, local: bool = False) -> float:
    """The factor yarn multiplies cos and sin by (1 for every other scaling)."""
    if local or cfg.rope_type != "yarn":
        return 1.0
    if cfg.rope_attention_factor:
        return float(cfg.rope_attention_factor)
    return 0.1 * math.log(cfg.rope_factor) + 1.0 if cfg.rope_factor > 1 else 1.0


def _dynamic(cfg: Any, positions: jax.Array) -> jax.Array:
    """Per-row inverse frequencies [B, head_dim // 2] of dynamic NTK scaling."""
    length = jnp.max(positions, axis=-1) + 1
    sp = sequence_parallel.active()
    if sp is not None:  # the row is split over the sequence axis
        length = jax.lax.pmax(length, sp.axis)
    context = cfg.rope_original_context
    length = jnp.maximum(length, context).astype(jnp.float32)
    d = cfg.head_dim
    base = cfg.rope_theta * ((cfg.rope_factor * length / context) - (cfg.rope_factor - 1)) ** (d / (d - 2))
    exponent = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    return 1.0 / (base[:, None] ** exponent)


def angles(cfg: Any, positions: jax.Array, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos and sin, fp32 [..., head_dim // 2], of int positions [B, S] (restarting at
    every packed document)."""
    if cfg.rope_type == "dynamic" and not local:
        inv_freq = _dynamic(cfg, positions)[:, None, :]
    else:
        inv_freq = jnp.asarray(frequencies(cfg, local))
    theta = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = attention_factor(cfg, local)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    return (cos, sin) if factor == 1.0 else (cos * factor, sin * factor)
