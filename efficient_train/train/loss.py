"""Next-token cross-entropy on a packed batch, returned as (sum, weight).

Returning the unnormalized sum and the token count (rather than a mean) lets the
step normalize once by the *global* token count, so the loss and gradients are
the same whatever the mesh, the micro-batching or the padding per device.

One code path for training and evaluation (both call the step's loss function): a
model with `hidden` and `output_head` (the built-in `Llama`) gives its final hidden
states and head to `cross_entropy`, which either forms the whole fp32 logits
(`chunk=0`) or runs the vocabulary-chunked loss of train/chunked_loss.py; any other
callable is taken to return logits. `make_loss` binds the run's `train.loss_chunk`,
`train.z_loss` and tensor split; `next_token_loss` is the whole-logits default.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from efficient_train.data import Batch
from efficient_train.train.chunked_loss import ChunkSpec, token_losses

# train.loss_chunk = -1 (auto): chunks of AUTO_CHUNK entries once the vocabulary has at
# least AUTO_MIN_VOCAB entries (BENCHMARKS.md, "Vocabulary-chunked loss": below it the
# logits are small and a whole-vocabulary GEMM is the faster program).
AUTO_MIN_VOCAB = 32768
AUTO_CHUNK = 8192


def resolve_chunk(loss_chunk: int, vocab_size: int) -> int:
    """The chunk width `train.loss_chunk` means for this vocabulary (0: whole logits)."""
    if loss_chunk == -1:
        return AUTO_CHUNK if vocab_size >= AUTO_MIN_VOCAB else 0
    return loss_chunk


def _from_logits(logits: jax.Array, targets: jax.Array, z_loss: float) -> jax.Array:
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit + z_loss * jnp.square(lse)


def cross_entropy(hidden: jax.Array, head: Any, targets: jax.Array, *, chunk: int = 0, vocab_shards: int = 1,
                  z_loss: float = 0.0) -> jax.Array:
    """Per-token fp32 -log p(target) (+ z_loss * lse^2) from hidden [..., hidden] and an
    `OutputHead`; chunk 0 forms the whole logits, chunk > 0 never does."""
    if chunk == 0:
        return _from_logits(head.logits(hidden), targets, z_loss)
    vocab = head.weight.shape[0 if head.vocab_major else 1]
    spec = ChunkSpec(vocab_major=head.vocab_major, dtype=jnp.dtype(head.dtype).name, chunk=chunk,
                     vocab_shards=vocab_shards if vocab % vocab_shards == 0 else 1, z_loss=z_loss,
                     softcap=float(head.softcap))
    flat = token_losses(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), spec)
    return flat.reshape(targets.shape)


def next_token_loss(model: Callable, batch: Batch, *, chunk: int = 0, vocab_shards: int = 1,
                    z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of the weighted per-token losses, sum of the weights) of `batch` under `model`."""
    if hasattr(model, "hidden") and hasattr(model, "output_head"):
        hidden = model.hidden(batch.inputs, batch.positions, batch.segment_ids)
        losses = cross_entropy(hidden, model.output_head(), batch.targets, chunk=chunk,
                               vocab_shards=vocab_shards, z_loss=z_loss)
    else:
        if chunk:
            raise ValueError("train.loss_chunk: a chunked loss needs a model with hidden() and output_head()")
        logits = model(batch.inputs, batch.positions, batch.segment_ids).astype(jnp.float32)
        losses = _from_logits(logits, batch.targets, z_loss)
    weights = batch.loss_weights.astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


def make_loss(chunk: int, vocab_shards: int, z_loss: float) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """The run's loss function: `next_token_loss` with its chunk width, tensor split and z-loss bound."""
    return functools.partial(next_token_loss, chunk=chunk, vocab_shards=vocab_shards, z_loss=z_loss)
