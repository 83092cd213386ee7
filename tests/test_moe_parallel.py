"""MoE training on 8 simulated devices: expert parallelism equals one device, the balance loss is
the global batch's, the HLO exchanges tokens by all-to-all, a collapsed router shows in the metrics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_train import Trainer
from efficient_train.data import Batch
from efficient_train.models import moe
from efficient_train.train.state import bind
from tests.support.hlo_utils import collectives
from tests.support.zero_setup import losses_in_subprocess, run_losses, small_config

EXPERTS = 4
MOE = {"model.num_experts": EXPERTS, "model.experts_per_token": 2, "model.moe_intermediate_size": 32,
       "checkpoint.every": 0, "train.batch_size": 32}


def _batch(rows: int, seq_len: int = 32, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (rows, seq_len + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
    return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions,
                 segment_ids=np.ones((rows, seq_len), np.int32), loss_weights=np.ones((rows, seq_len), np.float32))


def router_stats(trainer: Trainer, params: dict, inputs: np.ndarray) -> dict:
    """The MoE statistics (per-expert load, router probability sums, ...) of a forward pass of the
    trainer's model holding `params` on `inputs`, on the host."""
    step_def = trainer.setup.step_def
    model = bind(step_def.graphdef, step_def.param_structure, params, step_def.rest)

    @jax.jit
    def stats(tokens):
        with moe.collecting() as sink:
            model(tokens)
        return sink[0]

    return jax.device_get(stats(jnp.asarray(inputs)))


@pytest.mark.slow
def test_expert_parallel_training_equals_one_device():
    """5 steps: data=2 x expert=4 (ZeRO-1 and ZeRO-3, and with grad_accum=4), data=2 x expert=2 x
    tensor=2, data=2 x expert=2 x sequence=2 (Ulysses, ZeRO-3), and the capacity exchange with room for
    every assignment give the single-device losses (dropless routing: equal up to summation order)."""
    reference = losses_in_subprocess(1, {**MOE, "mesh.data": 1})
    for mesh in ({"mesh.data": 2, "mesh.expert": 4},
                 {"mesh.data": 2, "mesh.expert": 4, "zero_stage": 3},
                 {"mesh.data": 2, "mesh.expert": 4, "train.grad_accum": 4, "zero_stage": 2},
                 {"mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2},
                 # Capacity dispatch (GShard's exchange) with room for every assignment: nothing dropped.
                 {"mesh.data": 2, "mesh.expert": 4, "model.capacity_factor": 4.0},
                 {"mesh.data": 2, "mesh.expert": 2, "mesh.sequence": 2, "sequence_parallel.mode": "ulysses",
                  "zero_stage": 3}):
        losses, _ = run_losses({**MOE, **mesh})
        np.testing.assert_allclose(losses, reference, rtol=2e-6, atol=2e-5, err_msg=str(mesh))


def _expert_weight_shapes(trainer: Trainer) -> set[tuple[int, ...]]:
    params = trainer.state.params["blocks"]["mlp"]["experts"]
    return {tuple(x.shape) for x in jax.tree.leaves(params)}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_hlo_exchanges_tokens_by_all_to_all_and_never_gathers_experts_over_the_expert_axis(zero_stage):
    trainer = Trainer(small_config(**MOE, **{"mesh.data": 2, "mesh.expert": 4, "zero_stage": zero_stage}))
    found = collectives(trainer.compiled.as_text())
    exchanges = [c for c in found if c.op == "all-to-all"]
    # Forward and backward of each of the two exchanges (tokens, expert ids) per layer, scanned: at least 3.
    assert len(exchanges) >= 3
    whole = _expert_weight_shapes(trainer)  # [layers, experts, ...] as stored
    per_layer = {shape[1:] for shape in whole}
    gathered = [s for c in found if c.op == "all-gather" for s in c.shapes]
    assert not [s for s in gathered if s in whole or s in per_layer], gathered
    local_expert = {(shape[0], EXPERTS // 4, *shape[2:]) for shape in whole}
    local_per_layer = {shape[1:] for shape in local_expert}
    if zero_stage == 0:
        assert not gathered  # nothing is sharded over data: no gather at all
    else:  # ZeRO-3 gathers each layer's local experts over data only: [experts / 4, ...] per layer
        assert any(s in local_per_layer for s in gathered), gathered


@pytest.mark.slow
def test_balance_loss_over_grad_accum_and_data_ranks_is_the_concatenated_batch_loss():
    """grad_accum=4 x data=2 (x expert=4): moe/aux_loss equals the loss formed on the whole batch at once;
    each micro-batch's own frequencies (balance_scope micro_batch) give another value."""
    batch = _batch(32)
    values = {}
    for scope in ("global", "micro_batch"):
        config = small_config(**MOE, **{"mesh.data": 2, "mesh.expert": 4, "train.grad_accum": 4,
                                        "moe.balance_scope": scope})
        trainer = Trainer(config, data=iter([batch]))
        params = jax.device_get(trainer.state.params)
        values[scope] = float(trainer.step()["moe/aux_loss"])

    s = router_stats(trainer, params, batch.inputs)
    n, k = 32 * 32, 2
    expected = np.mean(EXPERTS * np.sum(s["load"] / (n * k) * s["prob_sum"] / n, axis=1))
    assert values["global"] == pytest.approx(expected, rel=1e-5)
    assert abs(values["micro_batch"] - expected) > 1e-4 * expected


@pytest.mark.slow
def test_a_router_sending_every_token_to_one_expert_shows_in_the_load_metric():
    config = small_config(**{**MOE, "mesh.data": 2, "mesh.expert": 4, "model.experts_per_token": 1})
    trainer = Trainer(config, data=iter([_batch(32)]))
    router = trainer.state.params["blocks"]["mlp"]["router"]
    # Equal logits: top-k takes the lowest index, so every token goes to expert 0.
    trainer.state.params["blocks"]["mlp"]["router"] = jnp.zeros_like(router)
    metrics = trainer.step()
    tokens = 32 * 32
    assert float(metrics["moe/layer0/max_load"]) == tokens
    assert float(metrics["moe/layer0/mean_load"]) == tokens / EXPERTS
    assert float(metrics["moe/max_load_ratio"]) == EXPERTS
    # Uniform probabilities hide it from the balance loss (X * f_0 * P_0 = 4 * 1 * 1/4); the load shows it.
    assert float(metrics["moe/aux_loss"]) == pytest.approx(1.0, rel=1e-6)


def test_model_statistics_are_whole_batch_counts():
    """The statistics a forward records: every token routed k times, probabilities summing to the tokens."""
    config = small_config(**MOE, **{"mesh.data": 8})
    from efficient_train.models import Llama, ModelConfig

    cfg = ModelConfig.from_config_dict(config.model)
    with nnx.use_eager_sharding(False):
        model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, inputs):
        with moe.collecting() as sink:
            nnx.merge(graphdef, state)(inputs)
        return sink[0]

    s = stats(state, jnp.asarray(_batch(4).inputs))
    np.testing.assert_array_equal(np.asarray(s["load"]).sum(axis=1), [4 * 32 * 2] * 2)
    np.testing.assert_allclose(np.asarray(s["prob_sum"]).sum(axis=1), [4 * 32] * 2, rtol=1e-5)


@pytest.mark.slow
def test_selection_bias_moves_against_the_global_load():
    """router_bias_update u: after one step on data=2 x expert=4 each layer's bias is u x sign(mean - load)
    of the whole batch's loads, and the optimizer left it alone (no gradient, no weight decay)."""
    batch = _batch(32)
    config = small_config(**{**MOE, "mesh.data": 2, "mesh.expert": 4, "model.router_bias_update": 0.01})
    trainer = Trainer(config, data=iter([batch]))
    params = jax.device_get(trainer.state.params)
    trainer.step()
    loads = np.asarray(router_stats(trainer, params, batch.inputs)["load"])
    expected = (0.01 * np.sign(loads.mean(axis=1, keepdims=True) - loads)).astype(np.float32)
    assert np.abs(expected).sum() > 0
    np.testing.assert_array_equal(np.asarray(trainer.state.params["blocks"]["mlp"]["router_bias"]), expected)
