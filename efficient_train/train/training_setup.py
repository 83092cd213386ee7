"""Everything about a training run that is decided before any array exists.

`build_setup` turns a config (and optionally the user's own module and loss) into
the model structure, the sharding plan, the optimizer and the shardings of a
TrainState, all from abstract shapes. The Trainer then materializes the state; the
`estimate` command instead lowers the step on abstract inputs and reads the
compiler's memory analysis, so a 70B model on 64 devices can be sized on a laptop.

A LoRA run (`finetune.lora.rank` > 0) splits the model's parameters with NNX filters:
`LoRAParam`s (the adapters) are the state's `params`, planned, differentiated and
optimized as any run's parameters; every other `nnx.Param` is the `frozen` base, placed
by its own plan at the same ZeRO stage (sharded under stage 3, gathered per layer like
the parameters) and never given an optimizer state or a gradient.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.data import Batch
from efficient_train.errors import ConfigError
from efficient_train.models import Llama, ModelConfig
from efficient_train.models.lora import LoRAConfig, LoRAParam, add_adapters
from efficient_train.optim import adamw, decay_mask, make_schedule, quantize_mask
from efficient_train.optim import state_shardings as optimizer_state_shardings
from efficient_train.parallel.param_gather import ZERO_AUTO_SPEC, ZERO_AXES, ZERO_DIM
from efficient_train.parallel.sharding import ShardingPlan, plan_sharding
from efficient_train.train.loss import make_loss, resolve_chunk
from efficient_train.train.moe_balance import MoeBalance
from efficient_train.train.state import TrainState, set_metadata
from efficient_train.train.step import LossFn, StepDefinition

LORA_KEY_SALT = 0x10EA  # adapters draw their init from the seed's key folded with this


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    config: ml_collections.ConfigDict
    mesh: Mesh
    create_model: Callable[[], nnx.Module]
    model_config: ModelConfig | None  # None for a user's own module
    step_def: StepDefinition
    abstract_state: TrainState  # ShapeDtypeStructs
    state_shardings: TrainState  # NamedShardings

    @property
    def plan(self) -> ShardingPlan:
        return self.step_def.plan

    @property
    def num_params(self) -> int:
        """Every parameter of the model, a LoRA run's frozen base included."""
        state = self.abstract_state
        return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves((state.params, state.frozen))))

    @property
    def num_trainable_params(self) -> int:
        return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(self.abstract_state.params)))

    @property
    def lora(self) -> LoRAConfig | None:
        return LoRAConfig.from_config_dict(self.config.finetune.lora) if self.model_config is not None else None

    def flops_per_token(self, seq_len: int) -> float:
        if self.model_config is not None:
            return float(self.model_config.flops_per_token(seq_len))
        return 6.0 * self.num_params

    def abstract_batch(self, global_batch: Any) -> Any:
        """ShapeDtypeStructs with the step's batch shardings, for lowering without data."""
        from efficient_train.train.step import batch_specs

        specs = batch_specs(global_batch, self.step_def.shard_sequence)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(self.mesh, s)), global_batch, specs
        )


def lm_batch_shapes(config: ml_collections.ConfigDict) -> Batch:
    """Global shapes of one token batch, for lowering the step without data."""
    shape = (config.train.batch_size, config.data.seq_len)
    ints = jax.ShapeDtypeStruct(shape, jnp.int32)
    return Batch(inputs=ints, targets=ints, positions=ints, segment_ids=ints, loss_weights=jax.ShapeDtypeStruct(shape, jnp.float32))


def zero3_metadata(structure: nnx.State, plan: ShardingPlan) -> nnx.State:
    """`structure` whose Variables carry what ZeRO-3's gather reads (param_gather): the ZeRO dim,
    the ZeRO group, and the placement over the shard_map's automatic axes (tensor) to keep."""
    structure = set_metadata(structure, ZERO_DIM, plan.zero_dims())
    structure = set_metadata(structure, ZERO_AXES, plan.leaf_zero_axes())
    return set_metadata(structure, ZERO_AUTO_SPEC, plan.auto_param_specs())


def _split_abstract(abstract_model: nnx.Module, *, lora: bool,
                    user_model: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None, nnx.State]:
    """(graphdef, trained parameters, a LoRA run's frozen base or None, the rest of the module state).
    A user's module holds real arrays; its parameters are replaced by their shapes and dtypes."""
    abstract_frozen = None
    if lora:
        graphdef, *states = nnx.split(abstract_model, LoRAParam, nnx.Param, ...)
        abstract_params, abstract_frozen, rest = states
    else:
        graphdef, *states = nnx.split(abstract_model, nnx.Param, ...)
        abstract_params, rest = states
    if user_model:
        abstract_params = jax.tree.map(
            lambda v: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)),
            abstract_params,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    return graphdef, abstract_params, abstract_frozen, rest


def _plan_with_metadata(abstract: nnx.State, mesh: Mesh, zero_stage: int) -> tuple[ShardingPlan, nnx.State]:
    """The sharding plan of `abstract` and its structure, carrying the ZeRO-3 gather metadata under stage 3."""
    plan = plan_sharding(abstract, mesh, zero_stage)
    return plan, (zero3_metadata(abstract, plan) if plan.params_sharded else abstract)


def _optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule, abstract_params: nnx.State,
               opt_param_shardings: Any) -> optax.GradientTransformation:
    """AdamW as `optimizer.*` configures it, its state placed per parameter by `opt_param_shardings`."""
    return adamw(
        schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
        state_format=opt.state_format, block_size=opt.block_size, min_quantized_size=opt.min_quantized_size,
        mask=decay_mask(abstract_params), quantize_mask=quantize_mask(abstract_params, embeddings=opt.quantize_embeddings),
        kernel=opt.kernel, shardings=opt_param_shardings,
    )


def build_setup(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    model: nnx.Module | None = None,
    loss_fn: LossFn | None = None,
    shard_sequence: bool = True,
) -> TrainSetup:
    _check_custom(config, model, loss_fn)
    model_config = None
    lora_config = None
    create_model: Callable[[], nnx.Module]
    if model is None:
        model_config = ModelConfig.from_config_dict(config.model, attention_impl=config.attention.impl,
                                                    norm_impl=config.norm.impl, moe_impl=config.moe.impl)
        lora_config = LoRAConfig.from_config_dict(config.finetune.lora)
        create_model = functools.partial(_create_llama, model_config, lora_config, config.seed)
    else:
        create_model = lambda: model
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(create_model) if model is None else model
    graphdef, abstract_params, abstract_frozen, rest = _split_abstract(abstract_model, lora=lora_config is not None,
                                                                       user_model=model is not None)
    plan, param_structure = _plan_with_metadata(abstract_params, mesh, config.zero_stage)
    frozen_plan = frozen_structure = None
    if abstract_frozen is not None:
        frozen_plan, frozen_structure = _plan_with_metadata(abstract_frozen, mesh, config.zero_stage)

    train = config.train
    schedule = make_schedule(train.schedule, train.learning_rate, train.warmup_steps, train.steps, train.min_lr_ratio)
    # The state lives where the ZeRO stage puts it; the fused kernel runs per device there.
    opt_param_shardings = plan.named(plan.opt_param_specs())
    optimizer = _optimizer(config.optimizer, schedule, abstract_params, opt_param_shardings)
    pure_params = nnx.to_pure_dict(abstract_params)
    abstract_opt_state = jax.eval_shape(optimizer.init, pure_params)
    scalar = NamedSharding(mesh, P())
    state_shardings = TrainState(
        step=scalar,
        params=plan.named(plan.param_specs()),
        opt_state=optimizer_state_shardings(abstract_opt_state, opt_param_shardings, offload=config.optimizer.offload),
        skipped_steps=scalar,
        frozen=None if frozen_plan is None else frozen_plan.named(frozen_plan.param_specs()),
    )
    int_scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(step=int_scalar, params=pure_params, opt_state=abstract_opt_state, skipped_steps=int_scalar,
                   frozen=None if abstract_frozen is None else nnx.to_pure_dict(abstract_frozen)),
        state_shardings,
    )
    step_def = StepDefinition(
        graphdef=graphdef,
        param_structure=param_structure,
        rest=rest if len(jax.tree.leaves(rest)) else None,
        plan=plan,
        optimizer=optimizer,
        schedule=schedule,
        loss_fn=loss_fn or _builtin_loss(config, mesh),
        model_gathers_per_layer=bool(getattr(abstract_model, "gathers_params_per_layer", False)),
        grad_accum=train.grad_accum,
        max_grad_norm=train.max_grad_norm,
        shard_sequence=shard_sequence,
        sequence_mode=config.sequence_parallel.mode,
        frozen_structure=frozen_structure,
        frozen_plan=frozen_plan,
        dropout_seed=config.seed if lora_config is not None and lora_config.dropout else None,
        moe=moe_balance(config, model_config),
    )
    return TrainSetup(config, mesh, create_model, model_config, step_def, abstract_state, state_shardings)


def moe_balance(config: ml_collections.ConfigDict, model_config: ModelConfig | None) -> MoeBalance | None:
    """The MoE losses' settings for a model with experts (None for a dense or user's model)."""
    if model_config is None or not model_config.num_experts:
        return None
    layers = sum(model_config.is_moe_layer(i) for i in range(model_config.num_layers))
    return MoeBalance(aux_loss=config.moe.aux_loss, z_loss=config.moe.z_loss, scope=config.moe.balance_scope,
                      num_experts=model_config.num_experts, experts_per_token=model_config.experts_per_token,
                      layers=layers, bias_update=model_config.router_bias_update)


def _create_llama(model_config: ModelConfig, lora_config: LoRAConfig | None, seed: int) -> Llama:
    """The built-in model; with LoRA its adapters, from a key of their own (the base's init is unchanged)."""
    model = Llama(model_config, rngs=nnx.Rngs(seed))
    if lora_config is not None:
        add_adapters(model, lora_config, jax.random.fold_in(jax.random.key(seed), LORA_KEY_SALT))
    return model


def _check_custom(config: ml_collections.ConfigDict, model: nnx.Module | None, loss_fn: LossFn | None) -> None:
    """Refuse, in one line, the fields that only the built-in model or loss reads."""
    if model is not None and config.model.matmul_precision != "bf16":
        raise ConfigError(f"model.matmul_precision: {config.model.matmul_precision!r} applies to the built-in "
                          "Llama only; a custom model chooses its own matmuls (use models.fp8.matmul)")
    if loss_fn is not None:
        for field, value in (("loss_chunk", config.train.loss_chunk > 0), ("z_loss", config.train.z_loss > 0)):
            if value:
                raise ConfigError(f"train.{field}: {config.train[field]} applies to the built-in loss only; "
                                  "the loss_fn given computes its own (leave it at its default)")


def _builtin_loss(config: ml_collections.ConfigDict, mesh: Mesh) -> LossFn:
    """next_token_loss with the run's chunk width, the tensor split of the vocabulary and z-loss."""
    chunk = resolve_chunk(config.train.loss_chunk, config.model.vocab_size)
    return make_loss(chunk, vocab_shards=int(mesh.shape["tensor"]), z_loss=float(config.train.z_loss))


def init_state(setup: TrainSetup, frozen: Any = None) -> TrainState:
    """Materialize parameters and optimizer state directly in their shardings.

    A LoRA run's base is `frozen` (the trainer passes the base checkpoint's placed
    parameters); without it the base is initialized from the seed, as a test wants.
    """
    step_def = setup.step_def
    lora_run = step_def.frozen_structure is not None
    trained = LoRAParam if lora_run else nnx.Param

    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            model = setup.create_model()
        params = nnx.to_pure_dict(nnx.state(model, trained))
        base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))) if lora_run else None
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=step_def.optimizer.init(params), skipped_steps=zero,
                          frozen=base if frozen is None else None)

    if setup.model_config is not None:
        shardings = setup.state_shardings if frozen is None else dataclasses.replace(setup.state_shardings, frozen=None)
        state = jax.jit(init, out_shardings=shardings)()
        return state if frozen is None else dataclasses.replace(state, frozen=frozen)
    # A user's module already holds concrete arrays: place them, then init the optimizer there.
    params = jax.device_put(nnx.to_pure_dict(nnx.state(setup.create_model(), nnx.Param)), setup.state_shardings.params)
    opt_state = jax.jit(step_def.optimizer.init, out_shardings=setup.state_shardings.opt_state)(params)
    # Two buffers: the state is donated, and one buffer may not be donated twice.
    step, skipped = (jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings.step) for _ in range(2))
    return TrainState(step=step, params=params, opt_state=opt_state, skipped_steps=skipped)
