"""Logical axis rules and ZeRO stages -> shardings of parameters, gradients, optimizer state.

Two layers of placement, decided per parameter from its *global* shape only:

1. Tensor parallelism: the parameter's logical axis names map to mesh axes through an
   ordered rule table (first rule naming the logical axis wins; a mesh axis of size 1,
   one that does not divide the dimension, or one already used by an earlier dimension
   drops out, leaving that dimension whole).
2. ZeRO: the ZeRO group is `data` x `expert` x `sequence` (the devices that would
   otherwise hold identical copies), less any axis the tensor spec already uses: an
   expert weight, split over `expert` by its 'experts' dimension, has the group
   `data` x `sequence` (its copies live only there), and its gradient is summed over
   the batch axes less `expert` (`LeafPlan.reduce_axes`). A stage shards a tensor along
   its largest dimension that the group divides and that no other mesh axis already
   uses; the stacked `layers` axis is never chosen, so a scan over layers stays local.
   `replica` is never sharded over (hybrid sharding: shard inside a node, replicate
   across nodes).

| stage | parameters | gradients | optimizer state |
|---|---|---|---|
| 0 | tensor | tensor | tensor |
| 1 | tensor | tensor | ZeRO |
| 2 | tensor | ZeRO | ZeRO |
| 3 | ZeRO | ZeRO | ZeRO |

The plan also gives the specs the train step's `shard_map` needs: that map is manual
over replica, data, expert and sequence and leaves `tensor` to the compiler, so its
specs name only the manual axes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import unflatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("replica", "data", "expert")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("router", None),
    ("embed", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),
)
ZERO_GROUP = ("data", "expert", "sequence")
BATCH_AXES = ("replica", "data", "expert")
MANUAL_AXES = ("replica", "data", "expert", "sequence")
LAYER_AXIS = "layers"
# A LoRA adapter's rank axis: replicated, and never the ZeRO dimension (like `layers`), so
# A keeps its base kernel's input placement and B its output placement.
LORA_RANK_AXIS = "lora_rank"


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a Flax variable carries (`nnx.with_partitioning` metadata)."""
    metadata = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = metadata.get(key)
        if names:
            return tuple(names)
    return None


def mesh_axes(axes: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _rule_table(rules: Rules) -> dict[str, MeshAxes]:
    table: dict[str, MeshAxes] = {}
    for logical, axes in rules:
        table.setdefault(logical, axes)
    return table


def indivisible_dims(shape: Sequence[int], names: Sequence[str | None] | None, rules: Rules,
                     mesh_shape: dict[str, int]) -> list[tuple[int, str, str, int]]:
    """(dim, logical name, mesh axis, axis size) where a rule's axis does not divide the dim.

    `tensor_spec` quietly leaves such a dimension whole (replicated over that axis); a
    tool that lays a checkpoint out for a mesh reports the ones the model cannot run with.
    """
    table = _rule_table(rules)
    found = []
    for dim, (extent, name) in enumerate(zip(shape, names or ())):
        if name is None:
            continue
        for axis in mesh_axes(table.get(name)):
            size = mesh_shape.get(axis, 1)
            if size > 1 and extent % size:
                found.append((dim, name, axis, size))
    return found


def tensor_spec(shape: Sequence[int], names: Sequence[str | None] | None, rules: Rules, mesh_shape: dict[str, int]) -> P:
    """Map logical names to mesh axes by the rule table (see the module docstring)."""
    if names is None:
        return P(*([None] * len(shape)))
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    table = _rule_table(rules)
    used: set[str] = set()
    entries: list[MeshAxes] = []
    for dim, name in zip(shape, names):
        chosen: list[str] = []
        extent = dim
        for axis in mesh_axes(table.get(name)) if name else ():
            size = mesh_shape.get(axis, 1)
            if size == 1 or axis in used or extent % size:
                continue
            chosen.append(axis)
            extent //= size
        used.update(chosen)
        entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*entries)


def choose_zero_dim(shape: Sequence[int], spec: P, names: Sequence[str | None] | None, group: int) -> int | None:
    """The largest dimension the ZeRO group divides and no mesh axis uses (never `layers` or `lora_rank`)."""
    if group == 1:
        return None
    best = None
    for dim, (extent, entry) in enumerate(zip(shape, spec)):
        if entry is not None or extent % group:
            continue
        if names is not None and names[dim] in (LAYER_AXIS, LORA_RANK_AXIS):
            continue
        if best is None or extent > shape[best]:
            best = dim
    return best


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Placement of one parameter: its tensor-parallel spec and its ZeRO dimension."""

    shape: tuple[int, ...]
    dtype: Any
    tensor: P
    zero_dim: int | None
    zero_axes: tuple[str, ...] = ()  # this leaf's ZeRO group: axes of ZERO_GROUP over 1 its tensor spec leaves free

    @property
    def tensor_axes(self) -> tuple[str, ...]:
        """The mesh axes the tensor spec splits this leaf over."""
        return tuple(axis for entry in self.tensor for axis in mesh_axes(entry))

    def reduce_axes(self, batch_axes: tuple[str, ...]) -> tuple[str, ...]:
        """The batch axes this leaf's gradient is summed over: those that do not split the leaf itself."""
        return tuple(axis for axis in batch_axes if axis not in self.tensor_axes)

    def spec(self, zero: bool, keep: tuple[str, ...] | None = None) -> P:
        """The spec with (zero=True) or without the ZeRO axes; `keep` filters to those mesh axes."""
        entries = list(self.tensor) + [None] * (len(self.shape) - len(self.tensor))
        zero_axes = self.zero_axes
        if zero and self.zero_dim is not None:
            entries[self.zero_dim] = zero_axes[0] if len(zero_axes) == 1 else zero_axes
        if keep is not None:
            entries = [_filter_entry(entry, keep) for entry in entries]
        return P(*entries)


def _filter_entry(entry: MeshAxes, keep: tuple[str, ...]) -> MeshAxes:
    kept = tuple(axis for axis in mesh_axes(entry) if axis in keep)
    return None if not kept else kept[0] if len(kept) == 1 else kept


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where every parameter, gradient and optimizer-state leaf lives for one ZeRO stage."""

    mesh: Mesh
    zero_stage: int
    leaves: Any  # pure-dict tree of LeafPlan, the structure of the parameters

    @property
    def zero_axes(self) -> tuple[str, ...]:
        """The ZeRO group of a dense parameter (an expert weight's leaves out `expert`: LeafPlan.zero_axes)."""
        return tuple(axis for axis in ZERO_GROUP if self.mesh.shape[axis] > 1)

    @property
    def params_sharded(self) -> bool:
        return self.zero_stage >= 3

    @property
    def grads_sharded(self) -> bool:
        return self.zero_stage >= 2

    @property
    def opt_state_sharded(self) -> bool:
        return self.zero_stage >= 1

    def _specs(self, zero: bool, keep: tuple[str, ...] | None = None) -> Any:
        return jax.tree.map(lambda leaf: leaf.spec(zero, keep), self.leaves, is_leaf=_is_leaf_plan)

    def param_specs(self) -> Any:
        return self._specs(self.params_sharded)

    def grad_specs(self) -> Any:
        return self._specs(self.grads_sharded)

    def opt_param_specs(self) -> Any:
        """Specs for the parameter-shaped parts of the optimizer state."""
        return self._specs(self.opt_state_sharded)

    def manual_param_specs(self) -> Any:
        """Parameter specs as the step's shard_map sees them (manual axes only)."""
        return self._specs(self.params_sharded, keep=MANUAL_AXES)

    def manual_grad_specs(self) -> Any:
        return self._specs(self.grads_sharded, keep=MANUAL_AXES)

    def auto_param_specs(self) -> Any:
        """Parameter specs over the axes the step's shard_map leaves automatic (tensor, where it has
        more than one device): the placement a ZeRO-3 gather over the manual axes must keep."""
        auto = tuple(axis for axis in self.mesh.axis_names if axis not in MANUAL_AXES and self.mesh.shape[axis] > 1)
        return self._specs(False, keep=auto)

    def zero_dims(self) -> Any:
        return jax.tree.map(lambda leaf: leaf.zero_dim, self.leaves, is_leaf=_is_leaf_plan)

    def leaf_zero_axes(self) -> Any:
        """Each leaf's ZeRO group (what ZeRO-3 gathers it over)."""
        return jax.tree.map(lambda leaf: leaf.zero_axes, self.leaves, is_leaf=_is_leaf_plan)

    def named(self, specs: Any) -> Any:
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs, is_leaf=_is_spec)


def _is_leaf_plan(node: Any) -> bool:
    return isinstance(node, LeafPlan)


def _is_spec(node: Any) -> bool:
    return isinstance(node, P)


def plan_sharding(abstract_params: nnx.State, mesh: Mesh, zero_stage: int, rules: Rules = DEFAULT_RULES) -> ShardingPlan:
    """Plan placement for an abstract parameter state (Variables with logical-axis metadata)."""
    mesh_shape = dict(mesh.shape)

    def leaf(variable: nnx.Variable) -> LeafPlan:
        value = variable.get_value()
        shape = tuple(value.shape)
        names = logical_axes(variable)
        spec = tensor_spec(shape, names, rules, mesh_shape)
        used = {axis for entry in spec for axis in mesh_axes(entry)}
        zero_axes = tuple(axis for axis in ZERO_GROUP if mesh_shape.get(axis, 1) > 1 and axis not in used)
        group = int(np.prod([mesh_shape[axis] for axis in zero_axes]))
        zero_dim = choose_zero_dim(shape, spec, names, group)
        return LeafPlan(shape, value.dtype, spec, zero_dim, zero_axes if zero_dim is not None else ())

    flat = {path: leaf(variable) for path, variable in nnx.to_flat_state(abstract_params)}
    return ShardingPlan(mesh, zero_stage, unflatten_dict(flat))


def batch_spec(ndim: int, shard_sequence: bool) -> P:
    """Leading dim over replica x data x expert; dim 1 over sequence for token batches."""
    if shard_sequence and ndim >= 2:
        return P(BATCH_AXES, "sequence", *([None] * (ndim - 2)))
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))):
        shard_shape = sharding.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
