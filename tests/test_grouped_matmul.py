"""The Pallas grouped matmul (pallas_kernels/grouped_matmul) and `moe.impl=pallas`.

The kernel runs in the Pallas interpreter here (Triton's kernel, the CPU has no Pallas
compiler); it equals jax.lax.ragged_dot, value and both gradients, for group layouts that
straddle row tiles, leave groups empty and leave rows past the last group; it lowers to
three Triton calls for CUDA; and the MoE train step with moe.impl=pallas holds the kernel
(no ragged_dot left) and trains like ragged_dot on an expert-parallel mesh.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import GroupedBlocks, grouped_matmul
from tests.support.zero_setup import run_losses, small_config

LAYOUTS = [  # (rows, K, N, group sizes)
    (100, 32, 48, [10, 0, 50, 30]),  # tiles straddle groups; an empty group; 10 rows past the groups
    (128, 64, 64, [64, 64, 0]),  # groups on tile boundaries; an empty last group
    (70, 16, 32, [0, 0, 3, 60, 2]),  # empty leading groups; a group inside one tile
    (64, 128, 16, [64]),  # one group: a plain matmul, several K tiles
]


def _case(rows: int, k: int, n: int, sizes: list[int], dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), dtype)
    dy = jnp.asarray(rng.normal(size=(rows, n)), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32), dy


def _value_and_grads(matmul, x, w, sizes, dy):
    out, vjp = jax.vjp(lambda a, b: matmul(a, b, sizes), x, w)
    return (out, *vjp(dy))


@pytest.mark.parametrize("layout", LAYOUTS, ids=[str(layout[3]) for layout in LAYOUTS])
def test_kernel_equals_ragged_dot_with_gradients(layout):
    x, w, sizes, dy = _case(*layout)
    ours = _value_and_grads(lambda a, b, s: grouped_matmul(a, b, s, interpret=True,
                                                           blocks=GroupedBlocks(block_m=32, block_k=16)), x, w, sizes, dy)
    reference = _value_and_grads(jax.lax.ragged_dot, x, w, sizes, dy)
    for name, a, b in zip(("out", "d_rows", "d_weights"), ours, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
    past = int(np.sum(layout[3]))
    assert not np.any(np.asarray(ours[0])[past:]) and not np.any(np.asarray(ours[1])[past:])


def test_bfloat16_kernel_accumulates_in_fp32():
    """bf16 inputs: the kernel's result is the fp32 product rounded once (as ragged_dot's with an
    fp32 accumulator), so it sits within bf16 rounding of the fp32 reference."""
    x, w, sizes, dy = _case(100, 32, 48, [10, 0, 50, 30], dtype=jnp.bfloat16)
    ours = grouped_matmul(x, w, sizes, interpret=True)
    assert ours.dtype == jnp.bfloat16
    exact = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(exact), rtol=1e-2, atol=1e-2)


def _primitives(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


def test_backend_choice_is_seen_in_the_program_and_bad_input_is_refused():
    x, w, sizes, _ = _case(64, 32, 32, [32, 32])
    assert "pallas_call" in _primitives(lambda a, b: grouped_matmul(a, b, sizes, interpret=True), x, w)
    auto = _primitives(lambda a, b: grouped_matmul(a, b, sizes), x, w)  # auto: ragged_dot
    assert "pallas_call" not in auto and "ragged_dot" in auto
    with pytest.raises(ValueError, match="mosaic_tpu"):
        grouped_matmul(x, w, sizes, backend="mosaic_tpu")
    with pytest.raises(ValueError, match="multiple of 16"):
        grouped_matmul(jnp.ones((8, 24)), jnp.ones((2, 24, 32)), sizes, interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes must be int \[G\]"):
        grouped_matmul(x, w, jnp.ones(3, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        GroupedBlocks(block_m=48)


def test_lowers_to_three_triton_kernels_for_cuda():
    """Forward, rows' gradient and weights' gradient lower for an NVIDIA GPU (not run here), at
    Qwen3-30B-A3B's expert widths with a row count off the tile grid."""
    def grads(x, w, sizes):
        loss = lambda a, b: jnp.sum(grouped_matmul(a, b, sizes, backend="triton").astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1))(x, w)

    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.ShapeDtypeStruct((1000, 2048), dtype)
        w = jax.ShapeDtypeStruct((128, 2048, 768), dtype)
        sizes = jax.ShapeDtypeStruct((128,), jnp.int32)
        text = jax.jit(grads).trace(x, w, sizes).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3, dtype


MOE = {"model.num_experts": 4, "model.experts_per_token": 2, "model.moe_intermediate_size": 32,
       "checkpoint.every": 0, "train.batch_size": 32}


def test_train_step_runs_the_kernel_and_no_ragged_dot():
    """moe.impl=pallas on data=2 x expert=4: every grouped matmul of the step (gate, up, down;
    forward, rows' and weights' gradients) is a pallas_call of the kernel, none is ragged_dot."""
    from efficient_train import Trainer
    from efficient_train.train.step import make_local_grads, over_batch_axes

    trainer = Trainer(small_config(**MOE, **{"mesh.data": 2, "mesh.expert": 4, "moe.impl": "pallas"}))
    step_def = trainer.setup.step_def
    local = over_batch_axes(make_local_grads(step_def), step_def, trainer.abstract_batch,
                            (step_def.plan.manual_grad_specs(), *(jax.sharding.PartitionSpec(),) * 3))
    jaxpr = _primitives(local, trainer.state.params, {}, trainer.abstract_batch)
    names = re.findall(r"name=(grouped_matmul\w*)", jaxpr)
    assert sorted(set(names)) == ["grouped_matmul", "grouped_matmul_transposed", "grouped_matmul_weight_grad"]
    assert names.count("grouped_matmul") == 3 and names.count("grouped_matmul_weight_grad") == 3
    assert "ragged_dot" not in jaxpr


@pytest.mark.slow
def test_expert_parallel_training_with_the_kernel_equals_ragged_dot():
    """5 steps on data=2 x expert=4 (ZeRO-3): the kernel's losses are ragged_dot's within fp32
    summation order."""
    mesh = {"mesh.data": 2, "mesh.expert": 4, "zero_stage": 3}
    reference, _ = run_losses({**MOE, **mesh})
    losses, _ = run_losses({**MOE, **mesh, "moe.impl": "pallas"})
    np.testing.assert_allclose(losses, reference, rtol=2e-6, atol=2e-5)
