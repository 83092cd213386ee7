"""Next-token cross-entropy on a packed batch, returned as (sum, weight).

Returning the unnormalized sum and the token count (rather than a mean) lets the
step normalize once by the *global* token count, so the loss and gradients are
the same whatever the mesh, the micro-batching or the padding per device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_train.data import Batch


def next_token_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    logits = model(batch.inputs, batch.positions, batch.segment_ids).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch.targets[..., None], axis=-1)[..., 0]
    weights = batch.loss_weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)
