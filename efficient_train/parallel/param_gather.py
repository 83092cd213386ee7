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

Two ways in:
- A model that knows about ZeRO-3 (the Llama decoder, `gathers_params_per_layer`)
  calls `gather` on each layer's state inside its own remat boundary.
- Any other Flax NNX module is bound with `gather_on_read`: each sharded `nnx.Param`
  becomes a `GatheredOnRead`, whose every read (`p[...]`, `p.get_value()`, arithmetic,
  attributes such as `.T`) all-gathers the shard at that point of the program. The step
  wraps the loss in `regather_in_backward`, a `jax.checkpoint` that keeps every
  residual except the gathered values: the backward gathers again where it needs a
  weight instead of holding all of them from the forward. Peak memory then holds the
  parameters of one use at a time (plus what the scheduler overlaps), not the model.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from efficient_train.parallel.context import TracingContext

ZERO_DIM = "zero_dim"
ZERO_AXES = "zero_axes"
ZERO_AUTO_SPEC = "zero_auto_spec"  # the PartitionSpec over the shard_map's automatic axes (tensor)
GATHERED_NAME = "zero3_gathered"  # the checkpoint_name of a value GatheredOnRead gathered

T = TypeVar("T")

_GATHER_AXES: TracingContext[tuple[str, ...]] = TracingContext("ZeRO-3 gather axes")


def gathering(axes: tuple[str, ...]) -> AbstractContextManager[None]:
    """Within this context (while tracing the step), `gather` all-gathers over `axes`."""
    return _GATHER_AXES.holding(tuple(axes))


def _all_gather(value: jax.Array, axes: tuple[str, ...], dim: int, auto_spec: P | None) -> jax.Array:
    """`value` all-gathered over `axes` along `dim`, keeping its split over the automatic axes.

    XLA partitions a collective inside a partially manual region with its operand replicated
    over the automatic axes: a bare all_gather would first gather a tensor-split weight over
    `tensor` too (whole heads, whole MLP), and its transpose would gather the gradient the same
    way. Inside a nested shard_map manual over those axes the all-gather sees only this
    device's tensor shard, and the parameter stays split over `tensor` where it is used."""
    def gather_shard(shard: jax.Array) -> jax.Array:
        return jax.lax.all_gather(shard, axes, axis=dim, tiled=True)

    auto_axes = set() if auto_spec is None else {
        axis for entry in auto_spec if entry is not None for axis in ((entry,) if isinstance(entry, str) else entry)}
    if not auto_axes:
        return gather_shard(value)
    assert auto_spec is not None
    return jax.shard_map(gather_shard, in_specs=auto_spec, out_specs=auto_spec, axis_names=auto_axes,
                         check_vma=False)(value)


def _gather_shard(value: jax.Array, metadata: dict, axes: tuple[str, ...], dropped: int) -> jax.Array:
    """The whole of `value`, a ZeRO-3 shard read without its `dropped` leading (stacked) dims, as its
    metadata says: along `zero_dim`, over its `zero_axes` (else `axes`), its `zero_auto_spec` kept."""
    dim = metadata[ZERO_DIM]
    if dim < dropped:
        raise ValueError(f"zero_dim {dim} lies in the {dropped} leading (stacked layer) dims; the layer axis is "
                         "never ZeRO-sharded")
    spec = metadata.get(ZERO_AUTO_SPEC)
    return _all_gather(value, tuple(metadata.get(ZERO_AXES) or axes), dim - dropped,
                       None if spec is None else P(*tuple(spec)[dropped:]))


def _gather_variable(variable: nnx.Variable, axes: tuple[str, ...], stacked_dims: int) -> nnx.Variable:
    metadata = variable.get_metadata()
    if metadata.get(ZERO_DIM) is None:
        return variable
    return variable.replace(_gather_shard(variable.get_value(), metadata, axes, stacked_dims))


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


STORED_NDIM = "stored_ndim"  # rank of the parameter as stored, so a read of a slice finds its dim


def _gather_at_read(value: jax.Array, metadata: dict) -> jax.Array:
    axes = _GATHER_AXES.current()
    if not axes:
        return value
    # Inside a scan or vmap over stacked layers (nnx.scan, nnx.vmap) a read sees the
    # parameter without its leading layer dims.
    dropped = metadata[STORED_NDIM] - value.ndim
    return checkpoint_name(_gather_shard(value, metadata, axes, dropped), GATHERED_NAME)


_WHOLE = object()  # no index given to get_value


class GatheredOnRead(nnx.Param):
    """A ZeRO-3 shard of a parameter that reads as the whole parameter: every read
    all-gathers it over the gathering axes (`zero_dim` from the metadata)."""

    def get_value(self, *, index: Any = _WHOLE) -> Any:
        whole = _gather_at_read(super().get_value(), self.get_metadata())
        return whole if index is _WHOLE or index is Ellipsis else whole[index]

    def __getattr__(self, name: str) -> Any:  # .T, .dtype, .ndim, ... of the whole value
        if name in self.get_metadata():
            return super().__getattr__(name)
        return getattr(self.get_value(), name)


def gather_on_read(state: nnx.State) -> nnx.State:
    """`state` with every Param that has a `zero_dim` turned into a `GatheredOnRead`."""

    def convert(variable: nnx.Variable) -> nnx.Variable:
        if not isinstance(variable, nnx.Param) or variable.get_metadata().get(ZERO_DIM) is None:
            return variable
        value = variable.get_raw_value()
        return GatheredOnRead(value, **(variable.get_metadata() | {STORED_NDIM: value.ndim}))

    return jax.tree.map(convert, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _keep_all_but_gathers(primitive: Any, *_: Any, **params: Any) -> bool:
    """A jax.checkpoint policy: every value is saved for the backward except gathered
    parameters (and the all-gathers that produce them), which the backward recomputes."""
    if primitive.name == "all_gather":
        return False
    return not (primitive.name == "name" and params.get("name") == GATHERED_NAME)


def regather_in_backward(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` whose backward all-gathers each parameter again at its use, saving nothing gathered."""
    return jax.checkpoint(fn, policy=_keep_all_but_gathers)
