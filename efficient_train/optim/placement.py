"""Where optimizer-state arrays live: shardings from the parameters' shardings, and offload.

`state_shardings` maps any AdamW state this package builds (optax.adamw's chain for
fp32, `CompressedAdamState` for the other formats) to NamedShardings: every array that
belongs to a parameter (a moment, or a quantized moment's codes, scales and exponents)
takes that parameter's sharding (the same PartitionSpec: the scales' last axis is the
parameter's last axis counted in blocks, so it splits the same way), and every other
leaf (step counters) is replicated. It reads the state's own structure, so unlike
optax.tree_map_params it needs no trace of the update and knows compressed leaves.

Blocks run along the global last axis, so a device quantizes its shard alone exactly
when its extent of that axis is a multiple of the block size; `state_shardings` warns,
once per placement, about the leaves where a sharding cuts blocks (their update then
needs collectives, still exact), and leaves the last axis of their scales (and of
their codes, if need be) whole where the mesh axes do not divide it.

Offload (ZeRO-Offload): the same shardings in `pinned_host` memory; the train step
moves the state to `device` memory for the update and back (`device_shardings`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.optim.compressed import (
    CompressedAdamState,
    local_extent_is_aligned,
)
from efficient_train.optim.quant import Quantized
from efficient_train.parallel.sharding import mesh_axes
from efficient_train.tree_paths import key_path_name

HOST = "pinned_host"
DEVICE = "device"


def _is_adam(node: Any) -> bool:
    return isinstance(node, (optax.ScaleByAdamState, CompressedAdamState))


def _is_sharding(node: Any) -> bool:
    return isinstance(node, NamedSharding)


def state_shardings(abstract_state: Any, param_shardings: Any, *, offload: bool = False) -> Any:
    """NamedShardings for every leaf of an AdamW state (see the module docstring)."""
    shardings_flat = jax.tree.leaves(param_shardings, is_leaf=_is_sharding)
    if not shardings_flat:
        raise ValueError("param_shardings: no NamedSharding found")
    mesh = shardings_flat[0].mesh
    memory_kind = HOST if offload else DEVICE
    place = lambda sharding: NamedSharding(sharding.mesh, sharding.spec, memory_kind=memory_kind)
    replicated = NamedSharding(mesh, P(), memory_kind=memory_kind)
    misaligned: list[str] = []

    def fitted(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
        """The parameter's spec, the last axis left whole where its mesh axes do not divide it."""
        entries = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
        if shape[-1] % math.prod(sharding.mesh.shape[axis] for axis in mesh_axes(entries[-1])):
            entries[-1] = None
        return place(NamedSharding(sharding.mesh, P(*entries)))

    def moment(path: tuple, leaf: Any, sharding: NamedSharding) -> Any:
        if isinstance(leaf, Quantized):
            if not local_extent_is_aligned(leaf.shape, sharding, leaf.block):
                misaligned.append(f"{key_path_name(path)} {leaf.shape} {sharding.spec} (block {leaf.block})")
            return dataclasses.replace(
                leaf,
                codes=fitted(sharding, leaf.codes.shape), scales=fitted(sharding, leaf.scales.shape),
                exponents=None if leaf.exponents is None else fitted(sharding, leaf.exponents.shape),
            )
        return place(sharding)

    def moments(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            moment, tree, param_shardings, is_leaf=lambda x: isinstance(x, Quantized)
        )

    def node(x: Any) -> Any:
        if isinstance(x, CompressedAdamState):
            return dataclasses.replace(x, count=replicated, mu=moments(x.mu), nu=moments(x.nu))
        if isinstance(x, optax.ScaleByAdamState):
            return x._replace(count=replicated, mu=moments(x.mu), nu=moments(x.nu))
        if getattr(x, "ndim", 0) != 0:
            raise ValueError(f"optimizer state leaf of shape {x.shape} belongs to no parameter; cannot place it")
        return replicated

    out = jax.tree.map(node, abstract_state, is_leaf=_is_adam)
    if misaligned:
        warnings.warn(
            "optimizer state: these quantized leaves have shards that cut blocks along the last axis, so their "
            "update needs collectives (results are unchanged): " + "; ".join(sorted(set(misaligned))),
            stacklevel=2,
        )
    return out


def is_offloaded(shardings: Any) -> bool:
    return any(s.memory_kind == HOST for s in jax.tree.leaves(shardings, is_leaf=_is_sharding))


def device_shardings(shardings: Any) -> Any:
    """The same placement in device memory (where the update runs)."""
    return jax.tree.map(lambda s: s.with_memory_kind(DEVICE), shardings, is_leaf=_is_sharding)
