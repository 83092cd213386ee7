"""ZeRO-3 for a user's own NNX module: parameters gather at each read, not all at once.

The model (tests/support/dense_stack.py) is a stack of L equal dense layers that knows
nothing of ZeRO. Its compiled train step on 8 devices must grow with L only by what each
layer keeps for the backward (activations) and by its gradient's shard, never by a
gathered parameter; every read gathers once in the forward and the backward gathers
again where it needs a weight; and training equals ZeRO-0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.parallel import param_gather
from tests.support.dense_stack import measure_in_subprocess, run_losses

WIDTH, ROWS, DEVICES, FLOAT = 512, 32, 8, 4
SMALL, LARGE = 4, 16


def test_every_way_of_reading_a_param_sees_the_whole_parameter():
    """Inside the step's shard_map each device holds an eighth of the rows; `p[...]`,
    `p.get_value()`, `p.T`, `p.shape` and arithmetic all read the gathered whole."""
    whole = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(whole, NamedSharding(mesh, P("data")))

    def local(shard):
        state = param_gather.gather_on_read(nnx.State({"w": nnx.Param(shard, zero_dim=0)}))
        param = state["w"]
        assert isinstance(param, param_gather.GatheredOnRead)
        with param_gather.gathering(("data",)):
            assert param.shape == whole.shape
            reads = (param[...], param.get_value(), param.T.T, param * 1.0, param[2:5])
        return jnp.stack([r if r.shape == whole.shape else jnp.pad(r, ((0, whole.shape[0] - 3), (0, 0)))
                          for r in reads])[None]

    out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(sharded)
    for device_reads in np.asarray(out):
        for read in device_reads[:4]:
            np.testing.assert_array_equal(read, whole)
        np.testing.assert_array_equal(device_reads[4][:3], whole[2:5])


@pytest.fixture(scope="module")
def measured() -> dict:
    return measure_in_subprocess(WIDTH, ROWS, (SMALL, LARGE), loss_layers=SMALL, steps=5)


@pytest.mark.slow
def test_step_memory_grows_by_activations_and_shards_not_gathered_layers(measured):
    temp = {n: measured["memory"][str(n)]["temp"] for n in (SMALL, LARGE)}
    extra_layers = LARGE - SMALL
    gathered_layer = (WIDTH * WIDTH + WIDTH) * FLOAT  # one layer's kernel and bias, whole
    gradient_shard = gathered_layer // DEVICES  # a layer's gradient, reduce-scattered (temp until the update)
    activations = 2 * (ROWS // DEVICES) * WIDTH * FLOAT  # kept per layer: its input and its tanh output
    growth = temp[LARGE] - temp[SMALL]
    assert growth <= extra_layers * (gradient_shard + activations), (temp, growth)
    # Holding the gathered layers would add 12 MiB; the bound above is 1.77 MiB.
    assert extra_layers * gathered_layer > 6 * extra_layers * (gradient_shard + activations)


@pytest.mark.slow
def test_each_read_gathers_and_the_backward_gathers_again(measured):
    for n in (SMALL, LARGE):
        # Forward: L kernels, L biases, the head's kernel (its 1-wide bias is not sharded).
        # Backward: the kernels that propagate a gradient to their input (layers 2..L and the head).
        assert measured["memory"][str(n)]["all_gathers"] == (2 * n + 1) + n


@pytest.mark.slow
def test_losses_equal_zero0(measured):
    zero0, zero3 = measured["losses"]["0"], measured["losses"]["3"]
    assert len(zero0) == 5 and np.all(np.isfinite(zero0))
    # Measured: bitwise equal (a gather and a reduce-scatter add no rounding here).
    np.testing.assert_allclose(zero3, zero0, rtol=1e-5)


@pytest.mark.slow
def test_layers_stacked_and_scanned_by_nnx_gather_their_slice():
    """nnx.vmap-stacked layers run by nnx.scan: a read inside the scan sees one layer's
    slice, whose ZeRO dim is one less than the stored parameter's."""
    zero0, zero3 = (run_losses(stage, 64, 4, ROWS, steps=3, scanned=True) for stage in (0, 3))
    np.testing.assert_allclose(zero3, zero0, rtol=1e-5)
