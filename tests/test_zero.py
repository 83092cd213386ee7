"""The ZeRO contract (the stage table in efficient_train/parallel/sharding.py, the collectives in
efficient_train/train/step.py), proven on 8 simulated devices from the compiled step.

Equivalence: every stage, tensor parallelism, hybrid replica x data and gradient
accumulation give the single-device losses. Memory: per-device state bytes follow
from the compiled program's input shardings and its memory analysis. Collectives:
read from the compiled HLO.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from efficient_train.parallel.sharding import per_device_bytes
from tests.support.hlo_utils import collectives, ops
from tests.support.zero_setup import losses_in_subprocess, run_losses

LAYOUTS = {
    "zero0": {"mesh.data": 8, "zero_stage": 0},
    "zero1": {"mesh.data": 8, "zero_stage": 1},
    "zero2": {"mesh.data": 8, "zero_stage": 2},
    "zero3": {"mesh.data": 8, "zero_stage": 3},
    "tensor2_zero3": {"mesh.data": 4, "mesh.tensor": 2, "zero_stage": 3},
    "replica2_data4_zero3": {"mesh.replica": 2, "mesh.data": 4, "zero_stage": 3},
    "zero2_grad_accum2": {"mesh.data": 8, "zero_stage": 2, "train.grad_accum": 2},
    "data2_sequence4_zero3": {"mesh.data": 2, "mesh.sequence": 4, "zero_stage": 3},
    "pallas_attention_data2_sequence4": {"mesh.data": 2, "mesh.sequence": 4, "zero_stage": 1, "attention.impl": "pallas"},
    # Sequence parallelism (tests/test_sequence_parallel.py): ring's batches arrive in the zigzag layout.
    "ulysses_data2_sequence4_zero3": {"mesh.data": 2, "mesh.sequence": 4, "zero_stage": 3, "sequence_parallel.mode": "ulysses"},
    "ring_data2_sequence4_zero3": {"mesh.data": 2, "mesh.sequence": 4, "zero_stage": 3, "sequence_parallel.mode": "ring"},
    "ring_sequence4_tensor2_grad_accum2_remat": {
        "mesh.data": 1, "mesh.sequence": 4, "mesh.tensor": 2, "sequence_parallel.mode": "ring",
        "train.grad_accum": 2, "model.remat": "full",
    },
}


@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    return losses_in_subprocess(1, {"mesh.data": 1})


# Layouts whose equivalence runs only in the whole suite (the fast tier keeps the four
# stages, tensor parallelism and one of each sequence-parallel shape).
SLOW_LAYOUTS = {"replica2_data4_zero3", "data2_sequence4_zero3", "zero2_grad_accum2", "pallas_attention_data2_sequence4",
                "ulysses_data2_sequence4_zero3", "ring_sequence4_tensor2_grad_accum2_remat", "zero2",
                "ring_data2_sequence4_zero3"}


class _Runs(dict):
    """Each layout trained on first use, so a deselected layout costs nothing."""

    def __missing__(self, name: str):
        self[name] = run_losses(LAYOUTS[name])
        return self[name]


@pytest.fixture(scope="module")
def runs() -> dict:
    return _Runs()


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_LAYOUTS else [])
                                  for name in sorted(LAYOUTS)])
def test_losses_equal_single_device(name, runs, reference_losses):
    losses, _ = runs[name]
    assert losses[-1] < losses[0]  # it is learning, so the comparison is not between constants
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)


def _total_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_zero3_state_is_one_eighth_per_device(runs):
    _, trainer = runs["zero3"]
    per_device = trainer.startup_record()["per_device_bytes"]
    total = _total_bytes(trainer.setup.abstract_state.params) + _total_bytes(trainer.setup.abstract_state.opt_state)
    assert per_device["params"] + per_device["opt_state"] <= 1.05 * total / 8
    # The compiled program's own arguments (state + batch) shrink accordingly.
    _, zero0 = runs["zero0"]
    args3 = trainer.compiled.memory_analysis().argument_size_in_bytes
    args0 = zero0.compiled.memory_analysis().argument_size_in_bytes
    batch = per_device_bytes(trainer.abstract_batch, jax.tree.map(lambda x: x.sharding, trainer.abstract_batch))
    assert args3 - batch <= 1.05 * (args0 - batch) / 8


def test_zero1_shards_optimizer_state_not_params(runs):
    _, trainer = runs["zero1"]
    per_device = trainer.startup_record()["per_device_bytes"]
    params_total = _total_bytes(trainer.setup.abstract_state.params)
    opt_total = _total_bytes(trainer.setup.abstract_state.opt_state)
    assert per_device["params"] == params_total
    assert per_device["opt_state"] <= 1.05 * opt_total / 8


def test_zero0_shards_nothing(runs):
    _, trainer = runs["zero0"]
    for sharding in jax.tree.leaves(trainer.setup.state_shardings):
        assert sharding.is_fully_replicated
    text = trainer.compiled.as_text()
    assert "reduce-scatter" not in ops(text)
    largest_param = max(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.setup.abstract_state.params))
    assert max(c.largest for c in collectives(text) if c.op == "all-reduce") >= largest_param


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_gradients_are_reduce_scattered_not_all_reduced(name, runs):
    _, trainer = runs[name]
    text = trainer.compiled.as_text()
    found = collectives(text)
    scattered = [c for c in found if c.op == "reduce-scatter"]
    # Every parameter's gradient arrives as its own shard by a reduce-scatter (under ZeRO-3,
    # one layer's slice at a time inside the layer scan); every all-reduce left is a scalar.
    params = trainer.setup.abstract_state.params
    shardings = trainer.setup.plan.named(trainer.setup.plan.grad_specs())
    expected = set()
    for path, (leaf, sharding) in zip(_paths(params), zip(jax.tree.leaves(params), jax.tree.leaves(shardings))):
        shard = sharding.shard_shape(leaf.shape)
        expected.add(shard[1:] if name == "zero3" and path[0] == "blocks" else shard)
    assert expected <= {shape for c in scattered for shape in c.shapes}
    assert all(c.largest <= 1 for c in found if c.op == "all-reduce"), [c for c in found if c.op == "all-reduce"]


def test_zero3_gathers_parameters_layer_by_layer(runs):
    _, trainer = runs["zero3"]
    stacked = {tuple(x.shape) for x in jax.tree.leaves(trainer.setup.abstract_state.params["blocks"])}
    per_layer = {shape[1:] for shape in stacked}
    gathered = {shape for c in collectives(trainer.compiled.as_text()) if c.op == "all-gather" for shape in c.shapes}
    # Inside the layer scan each layer's weights are gathered alone; never the whole stack.
    assert not gathered & stacked
    assert per_layer <= gathered


def _axis_groups(mesh, axis: str) -> frozenset:
    """The device-id groups a collective over `axis` alone runs in (the other axes fixed)."""
    ids = np.vectorize(lambda device: device.id)(mesh.devices)
    rows = np.moveaxis(ids, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
    return frozenset(frozenset(int(i) for i in row) for row in rows)


def _layer_shard_shapes(trainer) -> tuple[set, set]:
    """(every per-layer shape a decoder weight can take: whole, or split over ZeRO and/or tensor;
    each weight's ZeRO-3 gather result when the tensor split is kept)."""
    plan = trainer.setup.plan
    any_shape, tensor_split = set(), set()
    for leaf in jax.tree.leaves(plan.leaves["blocks"], is_leaf=lambda x: hasattr(x, "zero_dim")):
        for zero in (False, True):
            for keep in (("data",), ("tensor",), ("data", "tensor")):
                spec = leaf.spec(zero, keep=keep)
                any_shape.add(jax.sharding.NamedSharding(plan.mesh, spec).shard_shape(leaf.shape)[1:])
        tensor_only = jax.sharding.NamedSharding(plan.mesh, leaf.spec(False, keep=("tensor",)))
        tensor_split.add(tensor_only.shard_shape(leaf.shape)[1:])
    return any_shape, tensor_split


def test_zero3_under_tensor_parallelism_gathers_over_data_only(runs):
    """ZeRO-3's per-layer gather (and its reduce-scatter transpose) runs over the data axis
    alone: each decoder weight keeps its tensor split, never gathered into whole heads or MLP."""
    _, trainer = runs["tensor2_zero3"]
    mesh = trainer.setup.plan.mesh
    tensor, data = _axis_groups(mesh, "tensor"), _axis_groups(mesh, "data")
    # Mesh order replica, data, expert, sequence, tensor: tensor pairs neighbouring device ids.
    assert tensor == frozenset(frozenset({2 * i, 2 * i + 1}) for i in range(4))
    assert data == frozenset({frozenset({0, 2, 4, 6}), frozenset({1, 3, 5, 7})})
    any_shape, tensor_split = _layer_shard_shapes(trainer)
    found = [c for c in collectives(trainer.compiled.as_text()) if c.op in ("all-gather", "reduce-scatter")]
    over_tensor = [c for c in found if c.groups == tensor and set(c.shapes) & any_shape]
    assert not over_tensor, over_tensor
    assert tensor_split <= {shape for c in found if c.op == "all-gather" and c.groups == data for shape in c.shapes}


def _paths(tree) -> list[tuple]:
    return [tuple(getattr(k, "key", k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
