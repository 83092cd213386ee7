"""Parallelism: the mesh, the sharding plan (tensor parallel + ZeRO), ZeRO-3 gathers, sequence parallelism.

Everything that decides where a tensor lives or which collective moves it is here
(ARCHITECTURE.md, "Where each parallelism lives"):

- `axes`: mesh axis names, ZeRO stages, sequence-parallel modes (plain names).
- `mesh`: the device mesh and the multi-host start (`jax.distributed`).
- `sharding`: the logical-axis rule table and the per-parameter plan of each ZeRO stage.
- `param_gather`: ZeRO-3's layer-by-layer all-gather inside the step's shard_map.
- `sequence` with `all_gather`, `ulysses`, `ring`: attention over a split sequence;
  `layout` orders the tokens each mode expects; `heads` is Ulysses' head rule.
- `context`: the tracing-time context both gathers and sequence parallelism use.

The names below are imported on first use (efficient_train/lazy.py), so the plain
modules (`axes`, `heads`, `layout`) load without jax for `config.validate`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_train.lazy import lazy_attributes

__all__ = [
    "MESH_AXES", "SEQUENCE_PARALLEL_MODES", "ZERO_STAGES", "DEFAULT_RULES", "ShardingPlan", "plan_sharding",
    "make_mesh", "initialize_distributed",
]
__getattr__, __dir__ = lazy_attributes(__name__, {
    **dict.fromkeys(["MESH_AXES", "SEQUENCE_PARALLEL_MODES", "ZERO_STAGES"], "efficient_train.parallel.axes"),
    **dict.fromkeys(["DEFAULT_RULES", "ShardingPlan", "plan_sharding"], "efficient_train.parallel.sharding"),
    **dict.fromkeys(["make_mesh", "initialize_distributed"], "efficient_train.parallel.mesh"),
})

if TYPE_CHECKING:
    from efficient_train.parallel.axes import MESH_AXES, SEQUENCE_PARALLEL_MODES, ZERO_STAGES
    from efficient_train.parallel.mesh import initialize_distributed, make_mesh
    from efficient_train.parallel.sharding import DEFAULT_RULES, ShardingPlan, plan_sharding
