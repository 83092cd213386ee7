"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

`SamplingOptions.check()` refuses bad values with one line naming the flag and what
is allowed. `next_token` runs inside the compiled decode loop; the options are static,
so each combination compiles its own program and greedy decoding has no random draw.
Top-k keeps the k largest logits (ties at the k-th included), top-p the smallest set
of most likely tokens whose probability reaches p (the most likely always kept); both
apply after the temperature, as in Hugging Face's samplers.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from efficient_train.errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """temperature 0: greedy (argmax); top_k 0 and top_p 1: no truncation."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"--temperature: {self.temperature} must be a finite number >= 0 (0: greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"--top_k: {self.top_k} must be an integer >= 0 (0: no top-k)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"--top_p: {self.top_p} must lie in (0, 1] (1: no nucleus truncation)")


# The default of `generate` and `complete` (the options are frozen, so one shared instance is safe).
DEFAULT_SAMPLING = SamplingOptions()


def next_token(logits: jax.Array, key: jax.Array, options: SamplingOptions) -> jax.Array:
    """int32 [B] from fp32 logits [B, V]."""
    if options.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / options.temperature
    floor = jnp.finfo(jnp.float32).min
    if options.top_k:
        kth = jax.lax.top_k(logits, min(options.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, floor, logits)
    if options.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < options.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, floor, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
