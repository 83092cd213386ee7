"""Compressed states under sharding, on 8 simulated devices.

- Mesh independence: the same gradients give byte-identical parameters, codes and
  scales on one device, data=8 at every ZeRO stage, data=4 x tensor=2, and meshes that
  shard the last axis (data=2 x tensor=4, aligned with the blocks; tensor=8, cutting
  them), with the XLA path and with the Pallas kernel (interpreted) under shard_map.
- No collectives: where every shard holds whole blocks the compiled update has none.
- Placement: codes and scales carry their parameter's sharding, counters are replicated,
  fp32 placement is what optax.tree_map_params gave; offload keeps every state array in
  pinned host memory and changes no bit of the result.
- Memory: bytes of optimizer state per parameter, per format, and the compiled train
  step's arguments are exactly the state the startup record reports.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from efficient_train import Trainer, optim
from efficient_train.parallel.mesh import make_mesh
from efficient_train.parallel.sharding import per_device_bytes, plan_sharding
from efficient_train.train.training_setup import build_setup
from tests.support.hlo_utils import collectives
from tests.support.zero_setup import small_config

STEPS = 2
BLOCK = 128


class Tree(nnx.Module):
    """Parameters of Llama-like shapes and logical axes, small enough to compile fast."""

    def __init__(self, rngs: nnx.Rngs):
        def param(shape, axes):
            return nnx.Param(jax.random.normal(rngs.params(), shape) * 0.02, out_sharding=axes)

        self.embed = param((64, 256), ("vocab", "embed"))
        self.up = param((2, 256, 512), ("layers", "embed", "mlp"))
        self.down = param((2, 512, 256), ("layers", "mlp", "embed"))
        self.qkv = param((2, 256, 4, 32), ("layers", "embed", "heads", "head_dim"))
        self.norm = nnx.Param(jnp.ones((2, 256)), out_sharding=("layers", "norm"))


def _abstract_params() -> nnx.State:
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Tree(nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, ...)[1]


ABSTRACT = _abstract_params()
PURE = nnx.to_pure_dict(ABSTRACT)


def _mesh(**sizes):
    shape = {"replica": 1, "data": 1, "expert": 1, "sequence": 1, "tensor": 1, **sizes}
    return make_mesh(shape, jax.devices()[: int(np.prod(list(shape.values())))])


@jax.jit
def _tree(seed: jax.Array, scale: float) -> dict:
    leaves, treedef = jax.tree.flatten(PURE)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    rows = [jnp.exp(2.0 * jax.random.normal(jax.random.fold_in(k, 1), x.shape[:-1] + (1,))) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, [scale * r * jax.random.normal(k, x.shape) for k, r, x in zip(keys, rows, leaves)])


def _optimizer(state_format: str, kernel: str, opt_shardings=None):
    return optim.adamw(optax.linear_schedule(1e-2, 1e-3, 10), 0.9, 0.999, 1e-8, 0.1, state_format=state_format, block_size=BLOCK,
                       mask=optim.decay_mask(ABSTRACT), quantize_mask=optim.quantize_mask(ABSTRACT),
                       kernel=kernel, shardings=opt_shardings)


def _train(mesh, stage: int, state_format: str, kernel: str = "xla"):
    """STEPS fused updates under the stage's placement; returns (params, state, collectives)."""
    plan = plan_sharding(ABSTRACT, mesh, stage)
    params_sh, grads_sh = plan.named(plan.param_specs()), plan.named(plan.grad_specs())
    opt_sh = plan.named(plan.opt_param_specs())
    optimizer = _optimizer(state_format, kernel, opt_sh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # misaligned leaves are the point of some meshes here
        state_sh = optim.state_shardings(jax.eval_shape(optimizer.init, PURE), opt_sh)
    params = jax.device_put(_tree(0, 0.02), params_sh)
    state = jax.jit(optimizer.init, out_shardings=state_sh)(params)
    step = jax.jit(lambda g, s, p: optim.apply_updates(optimizer, g, s, p),
                   in_shardings=(grads_sh, state_sh, params_sh), out_shardings=(params_sh, state_sh), donate_argnums=(1, 2))
    compiled = step.lower(jax.device_put(_tree(1, 1.0), grads_sh), state, params).compile()
    for i in range(STEPS):
        params, state = compiled(jax.device_put(_tree(1 + i, 1.0), grads_sh), state, params)
    return jax.device_get(params), jax.device_get(state), collectives(compiled.as_text())


def _bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


LAYOUTS = {
    "data8_zero0": ({"data": 8}, 0),
    "data8_zero1": ({"data": 8}, 1),
    "data8_zero2": ({"data": 8}, 2),
    "data8_zero3": ({"data": 8}, 3),
    "data4_tensor2_zero3": ({"data": 4, "tensor": 2}, 3),
    "data2_tensor4_zero3": ({"data": 2, "tensor": 4}, 3),  # last axes sharded, whole blocks per device
    "tensor8_zero0": ({"tensor": 8}, 0),  # up's last axis sharded 8 ways: shards cut its blocks
}
RUNS = {
    "int8": [name for name in LAYOUTS if name != "tensor8_zero0"],
    "fp8": ["data2_tensor4_zero3"],
    "int4": ["tensor8_zero0"],
}


@functools.cache
def _one_device(state_format: str):
    return _train(_mesh(), 0, state_format)


@pytest.mark.slow
@pytest.mark.parametrize("state_format", sorted(RUNS))
def test_byte_identical_on_every_mesh_and_stage(state_format):
    reference = _one_device(state_format)
    assert isinstance(reference[1].mu["up"], optim.Quantized) and reference[1].mu["up"].block == BLOCK
    for name in RUNS[state_format]:
        sizes, stage = LAYOUTS[name]
        params, state, found = _train(_mesh(**sizes), stage, state_format)
        assert _bytes((params, state)) == _bytes(reference[:2]), name
        if name == "data2_tensor4_zero3":  # everything sharded alike, every shard whole blocks
            assert found == [], found
        if name == "data8_zero3":  # up's and embed's shards cut blocks: the fallback communicates
            assert found


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) for name in ("data2_tensor4_zero3", "data8_zero3")])
def test_pallas_kernel_under_shard_map_matches_one_device(name):
    sizes, stage = LAYOUTS[name]
    reference = _one_device("int8")
    params, state, found = _train(_mesh(**sizes), stage, "int8", kernel="pallas")
    assert _bytes((params, state)) == _bytes(reference[:2])
    if name == "data2_tensor4_zero3":
        assert found == []


def test_misaligned_shards_warn_once_naming_the_leaves():
    def place(mesh, stage):
        plan = plan_sharding(ABSTRACT, mesh, stage)
        opt_sh = plan.named(plan.opt_param_specs())
        return optim.state_shardings(jax.eval_shape(_optimizer("int8", "xla").init, PURE), opt_sh)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligned = place(_mesh(data=2, tensor=4), 3)
        assert not caught
        cut = place(_mesh(data=8), 3)
    assert len(caught) == 1 and "up (2, 256, 512)" in str(caught[0].message) and "embed (64, 256)" in str(caught[0].message)
    up = cut.mu["up"]
    assert up.codes.spec == P(None, None, "data") and up.scales.spec == P(None, None, None)  # 4 blocks over 8 devices
    assert aligned.mu["up"].scales.spec == aligned.mu["up"].codes.spec == P(None, "data", "tensor")
    assert aligned.count.spec == P() and aligned.nu["norm"].spec == P(None, "data")  # the norm's own ZeRO-3 spec


@pytest.fixture(scope="module")
def trainers() -> dict:
    runs = {}
    for name, overrides in {
        "int8": {"optimizer.state_format": "int8"},
        "int8_offload": {"optimizer.state_format": "int8", "optimizer.offload": True},
    }.items():
        trainer = Trainer(small_config(**{"mesh.data": 8, "zero_stage": 3, **overrides}))
        losses = [float(trainer.step()["loss"]) for _ in range(STEPS)]
        runs[name] = (trainer, losses)
    return runs


@pytest.mark.slow
def test_offload_keeps_states_on_host_and_changes_nothing(trainers):
    on_device, losses = trainers["int8"]
    offloaded, offloaded_losses = trainers["int8_offload"]
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(offloaded.state.opt_state)}
    assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(on_device.state.opt_state)} == {"device"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(offloaded.state.params)} == {"device"}
    assert offloaded_losses == losses
    assert _bytes(offloaded.state) == _bytes(on_device.state)


@pytest.mark.slow
def test_compiled_step_holds_exactly_the_reported_state(trainers):
    trainer, _ = trainers["int8"]
    record = trainer.startup_record()["per_device_bytes"]
    batch = per_device_bytes(trainer.abstract_batch, jax.tree.map(lambda x: x.sharding, trainer.abstract_batch))
    counters = 2 * 4  # step and skipped_steps, int32
    assert trainer.compiled.memory_analysis().argument_size_in_bytes == record["params"] + record["opt_state"] + batch + counters


def test_fp32_placement_is_unchanged():
    config = small_config(**{"mesh.data": 8, "zero_stage": 2})
    setup = build_setup(config, _mesh(data=8))
    old = optax.tree_map_params(
        setup.step_def.optimizer, lambda _, spec: spec, setup.abstract_state.opt_state, setup.plan.opt_param_specs(),
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P),
    )
    assert jax.tree.leaves(setup.state_shardings.opt_state) == jax.tree.leaves(setup.plan.named(old))


BYTES_PER_PARAM = {"fp32": (7.99, 8.01), "bf16": (3.99, 4.05), "int8": (2.0, 2.05), "fp8": (2.0, 2.10), "int4": (1.0, 1.10)}


@pytest.mark.parametrize("state_format", sorted(BYTES_PER_PARAM))
def test_state_bytes_per_parameter(state_format):
    """A small Llama with real attention shapes (head_dim 128, so q/k/v blocks are 128);
    everything but the norms compressed. Replicated (ZeRO-0) so one device holds it all."""
    config = small_config(**{
        "mesh.data": 8, "zero_stage": 0, "optimizer.state_format": state_format,
        "model.hidden_size": 512, "model.intermediate_size": 1024, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.head_dim": 128, "model.num_layers": 2,
    })
    setup = build_setup(config, _mesh(data=8))
    per_device = per_device_bytes(setup.abstract_state.opt_state, setup.state_shardings.opt_state)
    low, high = BYTES_PER_PARAM[state_format]
    assert low <= per_device / setup.num_params <= high
