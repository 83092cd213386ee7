"""The MoE load-balancing and router z-losses over the global batch, and the `moe/...` metrics.

"Demons in the Detail" (Qwen): the balance loss must use expert frequencies over the
*global* batch (every micro-batch, every data rank), not each micro-batch's own, or
experts fail to specialize. The loss, averaged over the L MoE layers, is

    aux = mean_l  X * sum_i f_li * P_li,   f_li = load_li / (N k),  P_li = prob_sum_li / N

(X experts, k per token, N tokens in the global batch; 1 when perfectly balanced). f is
a count (no gradient), so the gradient is linear in each micro-batch's prob_sum once
the global f is known: each micro-batch contributes X * sum_i f_li * prob_sum_li / (N L)
and the contributions add up to aux exactly. So the step first needs the global loads:
- grad_accum == 1: the forward's own loads, summed over the batch axes (a psum of L x X
  numbers inside the differentiated function, with no gradient);
- grad_accum > 1 with balance_scope 'global': a forward pass over every micro-batch
  first (`global_loads`), the price of exactness (about a third of a step);
  balance_scope 'micro_batch' skips it and uses each micro-batch's loads over the data
  ranks (Megatron's default; each micro-batch's term is then divided by grad_accum).
The router z-loss is mean_l (sum over tokens of logsumexp(logits)^2) / N.

The step divides its summed loss by the global loss weight W (the sum of the batch's
`loss_weights`), so these terms enter the differentiated sum times W and come out of
the normalization as the coefficients promise; `loss` in the metrics stays the language
model's alone, the terms are `moe/aux_loss` and `moe/z_loss`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from efficient_train.models.moe import Stats


@dataclasses.dataclass(frozen=True)
class MoeBalance:
    """What the step needs to form the MoE losses: coefficients, scope, experts and k."""

    aux_loss: float
    z_loss: float
    scope: str
    num_experts: int
    experts_per_token: int
    layers: int  # MoE layers
    bias_update: float = 0.0  # model.router_bias_update: the auxiliary-loss-free bias step (0: none)


@dataclasses.dataclass(frozen=True)
class Frequencies:
    """The global quantities the balance terms are normalized by (no gradient)."""

    loads: jax.Array | None  # [L, X] assignments per expert (None: each forward's own, over the batch axes)
    tokens: jax.Array | None  # [L] routed tokens
    weight: jax.Array  # loss weight W the step divides by
    share: float  # 1, or 1 / grad_accum for a micro-batch's own frequencies


def psum(tree: Any, axes: tuple[str, ...]) -> Any:
    """`jax.lax.psum` over `axes`; the tree itself when there are none (outside any shard_map)."""
    return jax.lax.psum(tree, axes) if axes else tree


def batch_weight(batch: object) -> jax.Array:
    """This device's loss weight of `batch` (a data.Batch): what next_token_loss returns as its weight."""
    weights = getattr(batch, "loss_weights", None)
    if weights is None:
        raise ValueError("loss_fn: a model with experts scales its balance loss by the batch's loss weight; "
                         f"give batches with `loss_weights` (data.Batch), not {type(batch).__name__}")
    return jnp.sum(jnp.asarray(weights, jnp.float32))


def terms(balance: MoeBalance, stats: Stats, freq: Frequencies) -> tuple[jax.Array, jax.Array]:
    """This device's (balance, z) contributions: summed over every device and micro-batch they give
    the losses, and their gradients are the losses' gradients."""
    assert freq.loads is not None and freq.tokens is not None, "the global loads are filled in before the terms"
    layers = stats["prob_sum"].shape[0]
    n = jnp.maximum(freq.tokens, 1.0)  # [L]
    fraction = freq.loads / (n[:, None] * balance.experts_per_token)
    aux = balance.num_experts * jnp.sum(fraction * stats["prob_sum"] / n[:, None]) / layers
    z = jnp.sum(stats["z_sum"] / n) / layers
    return aux * freq.share, z * freq.share


def objective_extra(balance: MoeBalance, aux: jax.Array, z: jax.Array, weight: jax.Array) -> jax.Array:
    """What the terms add to the differentiated loss sum (which the step divides by `weight`)."""
    return jax.lax.stop_gradient(weight) * (balance.aux_loss * aux + balance.z_loss * z)


def update_router_bias(params: dict, loads: jax.Array, rate: float) -> dict:
    """DeepSeek V3's auxiliary-loss-free balancing: each MoE layer's selection bias moves by
    rate x sign(mean load - load), from the global batch's loads [L, X]. The biases are found by name
    ("blocks/mlp/router_bias" [L, X] when scanned, "blocks/{i}/mlp/router_bias" [X] per MoE layer i)."""
    flat = traverse_util.flatten_dict(params)
    keys = sorted((key for key in flat if key[-2:] == ("mlp", "router_bias")), key=lambda key: str(key[1]).zfill(9))
    step = rate * jnp.sign(jnp.mean(loads, axis=1, keepdims=True) - loads)
    if len(keys) == 1 and flat[keys[0]].ndim == 2:  # scanned: every layer is an MoE layer
        flat[keys[0]] = flat[keys[0]] + step.astype(flat[keys[0]].dtype)
    else:
        for layer, key in enumerate(keys):
            flat[key] = flat[key] + step[layer].astype(flat[key].dtype)
    return traverse_util.unflatten_dict(flat)


def metrics(stats: Stats, aux: jax.Array, z: jax.Array) -> dict[str, jax.Array]:
    """`moe/...` metrics from global statistics: the losses, dropped fraction, per-layer max and mean load."""
    loads = stats["load"]
    assignments = jnp.maximum(jnp.sum(loads), 1.0)
    out = {"moe/aux_loss": aux, "moe/z_loss": z, "moe/dropped_fraction": jnp.sum(stats["dropped"]) / assignments}
    mean = jnp.mean(loads, axis=1)
    peak = jnp.max(loads, axis=1)
    out["moe/max_load_ratio"] = jnp.max(peak / jnp.maximum(mean, 1e-9))
    for layer in range(loads.shape[0]):
        out[f"moe/layer{layer}/max_load"] = peak[layer]
        out[f"moe/layer{layer}/mean_load"] = mean[layer]
    return out
