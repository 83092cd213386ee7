"""The train step: one jitted function, explicit shardings, donated state.

Shape of the step (DeepSpeed's ZeRO, stated in the program so every backend,
the CPU included, runs the collectives the stage promises):

1. `jax.shard_map`, manual over replica x data x expert x sequence (tensor stays with the
   compiler), computes gradients of the *unnormalized* loss sum on the local batch,
   scanning over micro-batches for gradient accumulation. Under ZeRO-3 the model
   all-gathers each layer's parameters right before use (`parallel.param_gather`:
   the Llama decoder per layer, any other module at each read of a Param, re-gathered
   in the backward), so autodiff turns those gathers into reduce-scatters of the gradients.
2. Still inside the map, gradients are reduced over the batch axes: an all-reduce
   (stages 0-1), a reduce-scatter over the ZeRO group (stage 2; stage 3 already has
   it), then an all-reduce over `replica` only (hybrid sharding). An expert weight
   (split over `expert`) is summed over the batch axes less `expert`: its gradient
   arrived with the tokens, by all-to-all. A model with experts also gets the MoE
   balance and z losses over the global batch (train/moe_balance.py), which may take a
   forward pass over every micro-batch first.
3. Outside the map, with the compiler partitioning: normalize by the global loss
   weight, clip by global norm, AdamW update with the optimizer state where the stage
   puts it; stage 1 and 2 parameters are all-gathered back to whole by the output
   sharding. A step whose loss or gradient norm is not finite leaves parameters and
   optimizer state untouched and counts itself in `skipped_steps`. An optimizer state
   placed in pinned host memory (offload) moves to the device for the update and back;
   `optim.apply_updates` lets a compressed AdamW write the parameters in its own pass.

A LoRA run's frozen base (`TrainState.frozen`) enters the map beside the parameters in
its own specs and leaves the step untouched: it is never differentiated (the gradient
is taken with respect to the adapters only, so no weight gradient of the base is ever
computed), reduced, clipped or optimized. LoRA dropout draws from a key of the seed and
the step, folded inside the map with the device's batch index and the micro-batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from efficient_train.models import lora, moe
from efficient_train.optim import apply_updates, device_shardings, is_offloaded
from efficient_train.parallel import experts as expert_parallel
from efficient_train.parallel import param_gather
from efficient_train.parallel import sequence as sequence_parallel
from efficient_train.parallel.sharding import MANUAL_AXES, LeafPlan, ShardingPlan, batch_spec
from efficient_train.train import moe_balance
from efficient_train.train.moe_balance import Frequencies, MoeBalance
from efficient_train.train.state import TrainState, as_state

LossFn = Callable[[nnx.Module, Any], Any]


@dataclasses.dataclass(frozen=True)
class StepDefinition:
    """What the step needs besides the state: model structure, plan, optimizer, loss."""

    graphdef: nnx.GraphDef
    param_structure: nnx.State  # abstract parameters with logical axes (+ zero_dim under ZeRO-3)
    rest: nnx.State | None  # non-parameter module state, held constant
    plan: ShardingPlan
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    loss_fn: LossFn
    model_gathers_per_layer: bool
    grad_accum: int
    max_grad_norm: float
    shard_sequence: bool
    sequence_mode: str  # sequence_parallel.mode, used when the sequence axis is > 1
    # A LoRA run: the frozen base's abstract structure (metadata as param_structure's) and placement.
    frozen_structure: nnx.State | None = None
    frozen_plan: ShardingPlan | None = None
    dropout_seed: int | None = None  # LoRA dropout > 0: the seed its per-step keys come from
    moe: MoeBalance | None = None  # the MoE losses, for a model with experts

    def module(self, params: dict, frozen: dict | None = None, *, gather_on_read: bool = False) -> nnx.Module:
        """The model holding pure `params` (and a LoRA run's `frozen` base); with `gather_on_read`,
        each ZeRO-3-sharded parameter all-gathers where it is read (`param_gather.gather_on_read`)."""
        states = [as_state(self.param_structure, params)]
        if self.frozen_structure is not None:
            states.append(as_state(self.frozen_structure, frozen or {}))
        if gather_on_read:
            states = [param_gather.gather_on_read(state) for state in states]
        if self.rest is not None:
            states.append(self.rest)
        return nnx.merge(self.graphdef, *states)

    def manual_frozen_specs(self) -> Any:
        """The frozen base's specs inside the step's shard_map ({} without one)."""
        return {} if self.frozen_plan is None else self.frozen_plan.manual_param_specs()


def loss_terms(output: Any) -> tuple[jax.Array, jax.Array]:
    """A loss function returns (sum, weight) or a scalar mean (taken as weight 1)."""
    if isinstance(output, tuple):
        total, weight = output
        return jnp.asarray(total, jnp.float32), jnp.asarray(weight, jnp.float32)
    return jnp.asarray(output, jnp.float32), jnp.ones((), jnp.float32)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every floating leaf of `tree` is finite (one fused reduction each)."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def batch_specs(batch: Any, shard_sequence: bool) -> Any:
    return jax.tree.map(lambda x: batch_spec(len(x.shape), shard_sequence), batch)


def place_batch(local_batch: Any, shardings: Any) -> Any:
    """This process's rows of a batch as global arrays in the step's batch shardings."""
    return jax.tree.map(lambda x, sharding: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch, shardings)


def _axes_over_one(mesh_shape: dict[str, int], axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(axis for axis in axes if mesh_shape[axis] > 1)


def batch_axes(mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """The manual axes the batch is split over that have more than one device (what sums reduce over)."""
    return _axes_over_one(mesh_shape, MANUAL_AXES)


def micro_batches(batch: Any, count: int) -> Any:
    """[B, ...] leaves as [count, B / count, ...]: the scan over gradient-accumulation micro-batches."""
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def gathers_at_read(step_def: StepDefinition) -> bool:
    """Whether the model's ZeRO-3 parameters gather at each read (any module but the Llama
    decoder, which gathers per layer itself)."""
    plan = step_def.plan
    return plan.params_sharded and bool(plan.zero_axes) and not step_def.model_gathers_per_layer


def compiler_options(step_def: StepDefinition) -> dict[str, Any]:
    """XLA options the step compiles with (`lowered.compile(compiler_options=...)`).

    XLA:CPU removes `jax.checkpoint`'s optimization barriers before its CSE pass, which
    then merges the backward's re-gathers into the forward's gathers and keeps every
    gathered parameter alive until the backward; GPU and TPU remove them only after
    scheduling. So on a CPU a step that gathers at read keeps the barriers, and its
    program (and `estimate`) is the one a GPU runs."""
    if jax.default_backend() == "cpu" and gathers_at_read(step_def):
        return {"xla_disable_hlo_passes": "cse_barrier_expander"}
    return {}


def make_local_loss_and_stats(step_def: StepDefinition) -> Callable[..., tuple[tuple[jax.Array, jax.Array], Any]]:
    """(local parameters, local frozen base, local batch[, dropout key]) -> the loss's (sum, weight)
    on this device's tokens and the MoE router statistics of the forward (None without experts), as
    the step's shard_map body sees them: ZeRO-3 gathers (per layer, or at each read for a module that
    does not gather itself), the sequence split, the expert exchange and LoRA dropout are opened here."""
    plan = step_def.plan
    mesh_shape = dict(plan.mesh.shape)
    zero_axes = plan.zero_axes
    gathers = plan.params_sharded and bool(zero_axes)
    gather_on_read = gathers_at_read(step_def)
    split_sequence = step_def.shard_sequence and mesh_shape["sequence"] > 1
    expert_axis = expert_parallel.EXPERT_AXIS
    split_experts = mesh_shape.get(expert_axis, 1) > 1

    def local_loss(params: dict, frozen: dict, micro_batch: Any,
                   dropout_key: jax.Array | None = None) -> tuple[tuple[jax.Array, jax.Array], Any]:
        model = step_def.module(params, frozen, gather_on_read=gather_on_read)
        with contextlib.ExitStack() as contexts:
            if gathers:
                contexts.enter_context(param_gather.gathering(zero_axes))
            if split_sequence:
                contexts.enter_context(sequence_parallel.sharding("sequence", step_def.sequence_mode))
            if split_experts:
                contexts.enter_context(expert_parallel.exchanging(expert_axis, mesh_shape[expert_axis]))
            if dropout_key is not None:
                contexts.enter_context(lora.dropout_key(dropout_key))
            sink = contexts.enter_context(moe.collecting())
            terms = loss_terms(step_def.loss_fn(model, micro_batch))
        return terms, (sink[0] if sink else None)

    return param_gather.regather_in_backward(local_loss) if gather_on_read else local_loss


def make_local_loss(step_def: StepDefinition) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(local parameters, local frozen base, local batch[, dropout key]) -> the loss's (sum, weight)
    on this device's tokens. The train step differentiates it with respect to the parameters only;
    evaluation (evaluation.py) runs it forward only, without dropout."""
    local_loss = make_local_loss_and_stats(step_def)
    return lambda *args: local_loss(*args)[0]


def zero_extras(balance: MoeBalance | None) -> dict:
    """The accumulator of what `objective` returns beside the weight: MoE statistics and terms."""
    if balance is None:
        return {}
    per_layer = jnp.zeros((balance.layers, balance.num_experts))
    scalars = jnp.zeros((balance.layers,))
    return {"load": per_layer, "prob_sum": per_layer, "z_sum": scalars, "tokens": scalars, "dropped": scalars,
            "aux": jnp.zeros(()), "z": jnp.zeros(()), "lm": jnp.zeros(())}


def make_objective(forward: Callable, balance: MoeBalance | None, all_batch_axes: tuple[str, ...]) -> Callable:
    """(params, frozen, micro_batch, key, freq) -> (the differentiated sum, (weight, extras)): the
    loss's sum plus, for a model with experts, the MoE terms (times the global weight); `extras`
    holds the router statistics, the terms and the loss's own sum `lm`, all outside the gradient."""

    def objective(params: dict, frozen: dict, micro_batch: Any, key: jax.Array | None,
                  freq: Frequencies | None) -> tuple[jax.Array, tuple]:
        (total, weight), stats = forward(params, frozen, micro_batch, key)
        if balance is None or stats is None or freq is None:
            return total, (weight, {})
        if freq.loads is None:  # this forward's own loads, over the batch axes
            loads = moe_balance.psum(jax.lax.stop_gradient(stats["load"]), all_batch_axes)
            freq = dataclasses.replace(freq, loads=loads, tokens=moe_balance.psum(stats["tokens"], all_batch_axes))
        aux, z = moe_balance.terms(balance, stats, freq)
        extras = {**jax.lax.stop_gradient(stats), "aux": jax.lax.stop_gradient(aux), "z": jax.lax.stop_gradient(z)}
        return total + moe_balance.objective_extra(balance, aux, z, freq.weight), (weight, extras | {"lm": total})

    return objective


def make_frequencies(step_def: StepDefinition, forward: Callable, all_batch_axes: tuple[str, ...]) -> Callable:
    """(params, frozen, batch, key) -> the global loads the MoE terms use (None without experts):
    counted by a forward over every micro-batch first (scope 'global' with grad_accum > 1), else
    with the loads left None for each gradient forward to fill in from its own routing."""
    balance = step_def.moe
    grad_accum = step_def.grad_accum

    def frequencies(params: dict, frozen: dict, batch: Any, key: jax.Array | None) -> Frequencies | None:
        if balance is None:
            return None
        weight = moe_balance.psum(moe_balance.batch_weight(batch), all_batch_axes)
        if grad_accum == 1 or balance.scope != "global":
            return Frequencies(loads=None, tokens=None, weight=weight, share=1.0 / grad_accum)

        def count(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            micro_batch, index = xs
            micro_key = None if key is None else jax.random.fold_in(key, index)  # the gradient pass's routing
            _, stats = forward(params, frozen, micro_batch, micro_key)
            assert stats is not None, "a model with experts records its router statistics"
            return (carry[0] + stats["load"], carry[1] + stats["tokens"]), None

        zeros = (jnp.zeros((balance.layers, balance.num_experts)), jnp.zeros((balance.layers,)))
        indices = jnp.arange(grad_accum, dtype=jnp.int32)
        (loads, tokens), _ = jax.lax.scan(count, zeros, (micro_batches(batch, grad_accum), indices))
        loads, tokens = moe_balance.psum((jax.lax.stop_gradient(loads), tokens), all_batch_axes)
        return Frequencies(loads=loads, tokens=tokens, weight=weight, share=1.0)

    return frequencies


def reduce_gradient(grad: jax.Array, leaf: LeafPlan, plan: ShardingPlan, all_batch_axes: tuple[str, ...],
                    replica_axes: tuple[str, ...]) -> jax.Array:
    """One local gradient reduced over the batch axes as the ZeRO stage asks: all-reduced (stages 0-1,
    or a leaf ZeRO does not split), reduce-scattered over the ZeRO group (stage 2; stage 3's gather
    transpose already did), then all-reduced over `replica`. An expert weight skips `expert`."""
    batch = leaf.reduce_axes(all_batch_axes)
    if leaf.zero_dim is None or not leaf.zero_axes:
        return jax.lax.psum(grad, batch) if batch else grad
    if plan.params_sharded:
        reduced = grad
    elif plan.grads_sharded:
        reduced = jax.lax.psum_scatter(grad, leaf.zero_axes, scatter_dimension=leaf.zero_dim, tiled=True)
    else:
        return jax.lax.psum(grad, batch)
    return jax.lax.psum(reduced, replica_axes) if replica_axes else reduced


def accumulate_grads(grad_fn: Callable, grad_accum: int, balance: MoeBalance | None, params: dict, frozen: dict,
                     batch: Any, key: jax.Array | None, freq: Frequencies | None) -> tuple:
    """`grad_fn` over the local batch, as one call or summed by a scan over `grad_accum` micro-batches
    (each with its own dropout key): ((loss sum, (weight, extras)), gradients)."""
    if grad_accum == 1:
        return grad_fn(params, frozen, batch, key, freq)

    def accumulate(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        grads, total, weight, extras = carry
        micro_batch, index = xs
        micro_key = None if key is None else jax.random.fold_in(key, index)
        (t, (w, e)), g = grad_fn(params, frozen, micro_batch, micro_key, freq)
        return (jax.tree.map(jnp.add, grads, g), total + t, weight + w, jax.tree.map(jnp.add, extras, e)), None

    zeros = jax.tree.map(jnp.zeros_like, params)  # local shards: gradients have their shapes
    indices = jnp.arange(grad_accum, dtype=jnp.int32)
    carry = (zeros, jnp.zeros(()), jnp.zeros(()), zero_extras(balance))
    (grads, total, weight, extras), _ = jax.lax.scan(accumulate, carry, (micro_batches(batch, grad_accum), indices))
    return (total, (weight, extras)), grads


def make_local_grads(step_def: StepDefinition) -> Callable:
    """The shard_map body: local gradients reduced over the batch axes, loss sum and weight, MoE extras."""
    plan = step_def.plan
    mesh_shape = dict(plan.mesh.shape)
    all_batch_axes = batch_axes(mesh_shape)
    replica_axes = _axes_over_one(mesh_shape, ("replica",))
    forward = make_local_loss_and_stats(step_def)
    grad_fn = jax.value_and_grad(make_objective(forward, step_def.moe, all_batch_axes), has_aux=True)  # never `frozen`
    frequencies = make_frequencies(step_def, forward, all_batch_axes)

    def local_grads(params: dict, frozen: dict, batch: Any,
                    key_data: jax.Array | None = None) -> tuple[dict, jax.Array, jax.Array, dict]:
        # LoRA dropout: the step's key, folded with this device's place in the batch and the micro-batch.
        key = None if key_data is None else jax.random.wrap_key_data(key_data)
        if key is not None and all_batch_axes:
            key = jax.random.fold_in(key, jax.lax.axis_index(all_batch_axes))
        freq = frequencies(params, frozen, batch, key)
        (total, (weight, extras)), grads = accumulate_grads(grad_fn, step_def.grad_accum, step_def.moe,
                                                            params, frozen, batch, key, freq)
        grads = jax.tree.map(lambda grad, leaf: reduce_gradient(grad, leaf, plan, all_batch_axes, replica_axes),
                             grads, plan.leaves)
        if extras:
            total = extras.pop("lm")  # the loss's own sum; the MoE terms are metrics of their own
        if all_batch_axes:
            total, weight, extras = jax.lax.psum((total, weight, extras), all_batch_axes)
        return grads, total, weight, extras

    return local_grads


def over_batch_axes(local_fn: Callable, step_def: StepDefinition, example_batch: Any, out_specs: Any,
                    extra_specs: tuple = ()) -> Callable:
    """`local_fn(params, frozen, batch, *extra)` mapped manually over the batch axes (replica x data x
    expert x sequence), parameters and the frozen base in their manual specs, `extra` in `extra_specs`;
    `local_fn` itself when every such axis has one device."""
    plan = step_def.plan
    if all(plan.mesh.shape[axis] == 1 for axis in MANUAL_AXES):
        # Nothing to reduce over: skip the map, whose manual region costs the CPU
        # compiler about a third of a single-device step.
        return local_fn
    return jax.shard_map(
        local_fn,
        mesh=plan.mesh,
        in_specs=(plan.manual_param_specs(), step_def.manual_frozen_specs(),
                  batch_specs(example_batch, step_def.shard_sequence), *extra_specs),
        out_specs=out_specs,
        axis_names=set(MANUAL_AXES),
        check_vma=False,
    )


def build_train_step(step_def: StepDefinition, state_shardings: TrainState, example_batch: Any) -> jax.stages.Wrapped:
    """A jitted `step(state, batch) -> (state, metrics)` with explicit shardings, state donated."""
    plan = step_def.plan
    mesh = plan.mesh
    dropout = step_def.dropout_seed is not None
    sharded_grads = over_batch_axes(make_local_grads(step_def), step_def, example_batch,
                                    (plan.manual_grad_specs(), P(), P(), P()), extra_specs=(P(),) if dropout else ())
    grad_shardings = plan.named(plan.grad_specs())
    offload = is_offloaded(state_shardings.opt_state)
    opt_on_device = device_shardings(state_shardings.opt_state)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        frozen = {} if state.frozen is None else state.frozen
        # LoRA dropout draws from a key of the seed and the step (raw key data crosses the shard_map).
        keys = (jax.random.key_data(jax.random.fold_in(jax.random.key(step_def.dropout_seed or 0), state.step)),) \
            if dropout else ()
        grads, total, weight, extras = sharded_grads(state.params, frozen, batch, *keys)
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        weight_ok = weight > 0  # a batch with nothing to learn from (all masked) is skipped
        loss_weight = weight
        weight = jnp.maximum(weight, 1.0)
        loss = total / weight
        grad_norm = optax.tree.norm(grads) / weight
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Normalization by the global weight and clipping, in one pass over the gradients.
        scale = jnp.minimum(1.0, step_def.max_grad_norm / (grad_norm + 1e-6)) / weight
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)  # bf16 params keep bf16 grads

        def apply(params: Any, opt_state: Any) -> tuple[Any, Any]:
            params, opt_state = apply_updates(step_def.optimizer, grads, opt_state, params)
            if step_def.moe is not None and step_def.moe.bias_update:
                params = moe_balance.update_router_bias(params, extras["load"], step_def.moe.bias_update)
            return params, opt_state

        opt_state = jax.device_put(state.opt_state, opt_on_device) if offload else state.opt_state
        applied_steps = state.step - state.skipped_steps
        # Finite gradients, learning rate and state give a finite AdamW update (eps > 0 bounds
        # it), so these inputs decide; a conditional, not a select of old and new, because
        # the select would hold a second copy of parameters and state (measured: +80% temp
        # memory for int8 states at ZeRO-0). An overflow is still caught: `state_finite`.
        lr = step_def.schedule(applied_steps)
        applied = finite & weight_ok & jnp.isfinite(lr)
        new_params, new_opt_state = jax.lax.cond(applied, apply, lambda p, o: (p, o), state.params, opt_state)
        if offload:
            new_opt_state = jax.device_put(new_opt_state, state_shardings.opt_state)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            skipped_steps=state.skipped_steps + jnp.where(applied, 0, 1).astype(jnp.int32),
            frozen=state.frozen,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped_steps": new_state.skipped_steps,
            "loss_weight": loss_weight,
            # The trainer never saves a state for which this is 0 (it stops the run instead).
            "state_finite": all_finite((new_params, new_opt_state)).astype(jnp.int32),
        }
        if extras:
            metrics.update(moe_balance.metrics(extras, extras["aux"], extras["z"]))
        return new_state, metrics

    batch_shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), batch_specs(example_batch, step_def.shard_sequence))
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
