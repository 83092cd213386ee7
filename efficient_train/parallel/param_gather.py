"""ZeRO-3 parameter gathering, layer by layer, inside the train step's shard_map.

Under ZeRO-3 every device holds only its slice of each parameter. The step runs the
model inside a `jax.shard_map` that is manual over the ZeRO group, and the model
calls `gather` on one layer's parameters right before using them. The all-gather's
transpose is a reduce-scatter, so differentiating the step yields gradients that are
already reduce-scattered over the ZeRO group: DeepSpeed's ZeRO-3 shape, stated in the
program rather than left to the compiler (whose CPU backend would all-reduce).

Which dimension of a parameter is sharded is written by the trainer into the
variable's metadata (`zero_dim`, counted on the full, possibly layer-stacked shape),
and over which axes (`zero_axes`: an expert weight's group leaves out the `expert`
axis its experts are split over; without it, the context's axes).
Outside a `gathering(...)` context, or for a variable without `zero_dim`, `gather`
returns its input unchanged, so models stay usable on their own.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TypeVar

import jax
from flax import nnx

from efficient_train.parallel.context import TracingContext

ZERO_DIM = "zero_dim"
ZERO_AXES = "zero_axes"

T = TypeVar("T")

_GATHER_AXES: TracingContext[tuple[str, ...]] = TracingContext("ZeRO-3 gather axes")


def gathering(axes: tuple[str, ...]) -> AbstractContextManager[None]:
    """Within this context (while tracing the step), `gather` all-gathers over `axes`."""
    return _GATHER_AXES.holding(tuple(axes))


def _gather_variable(variable: nnx.Variable, axes: tuple[str, ...], stacked_dims: int) -> nnx.Variable:
    metadata = variable.get_metadata()
    dim = metadata.get(ZERO_DIM)
    if dim is None:
        return variable
    axes = tuple(metadata.get(ZERO_AXES) or axes)
    local_dim = dim - stacked_dims
    if local_dim < 0:
        raise ValueError(f"zero_dim {dim} lies in the stacked layer dims; the layer axis is never ZeRO-sharded")
    value = jax.lax.all_gather(variable.get_value(), axes, axis=local_dim, tiled=True)
    return variable.replace(value)


def gather(state: T, stacked_dims: int = 0) -> T:
    """All-gather every ZeRO-sharded variable in `state` (an nnx.State or Module).

    `stacked_dims` is how many leading dims of the stored parameter were sliced off
    before this call (1 inside a scan over stacked layers).
    """
    axes = _GATHER_AXES.current()
    if not axes:
        return state
    if isinstance(state, nnx.Module):
        graphdef, variables = nnx.split(state)
        return nnx.merge(graphdef, gather(variables, stacked_dims))
    return jax.tree.map(
        lambda v: _gather_variable(v, axes, stacked_dims),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
