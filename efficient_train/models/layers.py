"""Building blocks of the decoder: Linear, Embed, RMSNorm and applying rotary embeddings.

Every parameter is an `nnx.Param` carrying its logical axis names as the standard Flax
metadata `out_sharding=(...)` (the key `nnx.with_partitioning` writes), one name per
dimension, so `efficient_train.parallel.sharding` can map them to mesh axes with a rule table.
The names used across the model are 'vocab', 'embed', 'heads', 'kv_heads', 'head_dim',
'mlp', 'norm', and 'layers' for the stacked layer axis.

Parameters are stored in `param_dtype` and cast to the compute `dtype` at use, so a
bf16 model can keep fp32 master weights. Norm statistics and rotary angles are always
computed in fp32. The rotary tables themselves (and their scalings) are models/rope.py's.
`Linear` and `Embed` have one hook, `lora` (None unless models/lora.py attaches an
adapter), whose output is added to theirs.

With Flax's default eager sharding, creating a Param with `out_sharding` requires a
mesh; build models inside `with nnx.use_eager_sharding(False):` when there is none
(the trainer does, and places the state itself).

Initialisation: kernels are truncated-normal with variance 1/fan_in; the embedding is
normal with variance 1/hidden (Flax's default), so tied and untied output logits both
start with unit scale; norm scales start at one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_train.models.choices import NORM_IMPLS

Axes = tuple[str, ...]


class Linear(nnx.Module):
    """A projection contracting the last len(in_shape) dims of its input, bias optional.

    The kernel has shape in_shape + out_shape (e.g. q: (embed, heads, head_dim)) so each
    dimension keeps its own logical axis name rather than being flattened away; a bias
    (Qwen's q/k/v) has out_shape and the output dims' names, and starts at zero.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Axes, *,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs, bias: bool = False):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        shape = in_shape + out_shape
        if len(axes) != len(shape):
            raise ValueError(f"kernel of shape {shape} needs {len(shape)} axis names, got {axes}")
        n_in = len(in_shape)
        init = jax.nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal",
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(shape))))
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=axes)
        self.bias = nnx.Param(jnp.zeros(out_shape, param_dtype), out_sharding=axes[n_in:]) if bias else None
        self.n_in = n_in
        self.dtype = dtype
        self.lora: Any = nnx.data(None)  # a LoRA adapter (models/lora.py attaches it)

    def __call__(self, x: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """x[..., *in_shape] -> [..., *out_shape] in `out_dtype` (default: compute dtype)."""
        kernel = self.kernel.get_value().astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel, (contract, ((), ())),
            preferred_element_type=out_dtype or self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ('vocab', 'embed'); `attend` reuses it as a tied output head."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.embedding = nnx.Param(
            init(rngs.params(), (vocab_size, hidden_size), param_dtype), out_sharding=("vocab", "embed"))
        self.dtype = dtype
        self.lora: Any = nnx.data(None)  # a LoRA adapter (models/lora.py attaches it)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding.get_value(), ids, axis=0).astype(self.dtype)
        return x if self.lora is None else x + self.lora.lookup(ids).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., embed] -> fp32 logits [..., vocab] = x @ embedding.T."""
        table = self.embedding.get_value().astype(self.dtype)
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), table,
                          preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in fp32, returned in `dtype`.

    With `plus_one` (Gemma) the multiplier is 1 + scale, added in fp32, and the scale
    starts at zero. impl: 'xla' (the code below, which XLA fuses), 'pallas' (the fused
    kernel `pallas_kernels.rms_norm`, same arithmetic, run in the Pallas interpreter on
    the CPU), 'auto' (xla, until GPU benchmarks say otherwise).
    """

    def __init__(self, size: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 impl: str = "auto", plus_one: bool = False):
        if impl not in NORM_IMPLS:
            raise ValueError(f"norm impl must be one of {NORM_IMPLS}, got {impl!r}")
        start = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(start((size,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype
        self.impl = impl
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.scale.get_value()
        if self.plus_one:
            scale = 1.0 + scale.astype(jnp.float32)
        if self.impl == "pallas":
            from pallas_kernels import rms_norm
            from pallas_kernels.backends import default_interpret

            return rms_norm(x, scale, eps=self.eps, out_dtype=self.dtype,
                            backend="auto", interpret=default_interpret())
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, S, heads, head_dim] by angles [B, S, head_dim // 2], in fp32.

    Uses the rotate-half layout (dimension i pairs with i + head_dim/2), the convention
    of Hugging Face Llama checkpoints.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
