"""Conversion between compressed and fp32 AdamW states, and their JSON description.

`to_fp32` reads the moments out of any AdamW state this package builds (or optax's
own) as an `optax.ScaleByAdamState` with float32 mu and nu (nu is v, squared back from
the stored sqrt(v)): for export, inspection, or a switch of format. `from_fp32` puts
such moments into the state layout of a given optimizer (an fp32 optax.adamw, or any
compressed format), quantizing where that layout quantizes and setting the step
counters, so `from_fp32(to_fp32(s), other_optimizer, params)` converts between formats
and an fp32 optax run can continue with compressed states. Conversion to a compressed
format is lossy by the format's rounding, once.

`describe_state` is the JSON a checkpoint stores next to the arrays: format version, v
domain, and per quantized leaf its code maps and block size. The arrays themselves
are ordinary global arrays (codes, scales, exponents) that any mesh can load.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from efficient_train.optim.compressed import CompressedAdamState
from efficient_train.optim.quant import Quantized, dequantize, quantize_blocks
from efficient_train.tree_paths import key_path_name

FORMAT_VERSION = 1


def _is_node(x: Any) -> bool:
    return isinstance(x, (optax.ScaleByAdamState, CompressedAdamState))


def adam_node(state: Any) -> Any:
    nodes = [x for x in jax.tree.leaves(state, is_leaf=_is_node) if _is_node(x)]
    if len(nodes) != 1:
        raise ValueError(f"expected one AdamW moment state in the optimizer state, found {len(nodes)}")
    return nodes[0]


def _is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def to_fp32(state: Any) -> optax.ScaleByAdamState:
    """The AdamW moments of `state` as float32 (count, mu, nu = v)."""
    node = adam_node(state)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    if isinstance(node, optax.ScaleByAdamState):
        return optax.ScaleByAdamState(node.count, jax.tree.map(f32, node.mu), jax.tree.map(f32, node.nu))

    def second(x: Any) -> jax.Array:
        return jnp.square(dequantize(x)) if _is_quantized(x) else f32(x)

    return optax.ScaleByAdamState(
        count=node.count,
        mu=jax.tree.map(dequantize, node.mu, is_leaf=_is_quantized),
        nu=jax.tree.map(second, node.nu, is_leaf=_is_quantized),
    )


def _like(target: Any, x: jax.Array, sqrt_domain: bool) -> Any:
    x = jnp.asarray(x, jnp.float32)
    if _is_quantized(target):
        return quantize_blocks(jnp.sqrt(x) if sqrt_domain else x, target.code, target.block)
    return x.astype(target.dtype)


def from_fp32(moments: optax.ScaleByAdamState, optimizer: optax.GradientTransformation, params: Any) -> Any:
    """A state of `optimizer` for `params` holding `moments` (float32 count, mu, nu = v)."""
    count = jnp.asarray(moments.count, jnp.int32)

    def convert(node: Any) -> Any:
        if isinstance(node, CompressedAdamState):
            mu = jax.tree.map(lambda t, x: _like(t, x, False), node.mu, moments.mu, is_leaf=_is_quantized)
            nu = jax.tree.map(lambda t, x: _like(t, x, True), node.nu, moments.nu, is_leaf=_is_quantized)
            return dataclasses.replace(node, count=count, mu=mu, nu=nu)
        if isinstance(node, optax.ScaleByAdamState):
            cast = lambda t, x: jnp.asarray(x, t.dtype)
            return optax.ScaleByAdamState(count, jax.tree.map(cast, node.mu, moments.mu), jax.tree.map(cast, node.nu, moments.nu))
        if isinstance(node, optax.ScaleByScheduleState):
            return optax.ScaleByScheduleState(count)
        return node

    is_node = lambda x: _is_node(x) or isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(convert, optimizer.init(params), is_leaf=is_node)


def describe_state(state: Any) -> dict[str, Any]:
    """JSON-ready description of the stored format (see the module docstring)."""
    node = adam_node(state)
    if isinstance(node, optax.ScaleByAdamState):
        return {"format_version": FORMAT_VERSION, "v_domain": "v", "quantized": {}}
    paths = jax.tree_util.tree_flatten_with_path(node.mu, is_leaf=_is_quantized)[0]
    nus = jax.tree.leaves(node.nu, is_leaf=_is_quantized)
    quantized = {}
    for (path, m), v in zip(paths, nus):
        if _is_quantized(m):
            quantized[key_path_name(path)] = {"m": m.code.name, "v": v.code.name, "block": m.block}
    return {"format_version": FORMAT_VERSION, "v_domain": "sqrt(v) where quantized, else v", "quantized": quantized}
