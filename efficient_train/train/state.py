"""TrainState: everything a step reads and writes, as one pytree.

Parameters and optimizer state are pure dicts (nested dicts of arrays), not NNX
Variables: they shard, checkpoint and pass through optax without carrying metadata
in the tree structure. A LoRA run splits the parameters into `params` (the adapters,
what trains) and `frozen` (the base weights). `bind` turns pure parameters back into a module, taking the
variables' metadata (logical axes, ZeRO dimension) from an abstract template.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
from flax import nnx, traverse_util


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken, skipped ones included
    params: Any  # pure dict of what trains (a LoRA run: the adapters only)
    opt_state: Any  # optax state over the pure-dict parameters
    skipped_steps: jax.Array  # int32 scalar: steps whose gradients were not finite
    # A LoRA run's frozen base weights (pure dict): read by the step, never differentiated, never in
    # the optimizer, and not saved with the run (its checkpoint names the base instead). None otherwise.
    frozen: Any = None


def bind(graphdef: nnx.GraphDef, template: nnx.State, params: dict, rest: nnx.State | None = None) -> nnx.Module:
    """A module from pure parameters; metadata comes from `template`'s Variables."""
    state = as_state(template, params)
    return nnx.merge(graphdef, state) if rest is None else nnx.merge(graphdef, state, rest)


def as_state(template: nnx.State, params: dict) -> nnx.State:
    """Pure parameters as an nnx.State of Variables with `template`'s metadata."""
    values = traverse_util.flatten_dict(params)
    return nnx.from_flat_state({path: variable.replace(values[path]) for path, variable in nnx.to_flat_state(template)})


def set_metadata(template: nnx.State, key: str, values: dict) -> nnx.State:
    """A copy of `template` whose Variables carry `key=values[path]` metadata."""
    flat_values = traverse_util.flatten_dict(values)
    out = {}
    for path, variable in nnx.to_flat_state(template):
        copy = variable.replace(variable.get_value())
        copy.set_metadata(key, flat_values[path])
        out[path] = copy
    return nnx.from_flat_state(out)
