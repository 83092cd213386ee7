"""The MoE block against a per-token reference, capacity mode's drops, the config's refusals.

Cheap tests (no train step): the module runs eagerly on tiny shapes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_train.config import ConfigError, default_config, validate, validate_fields
from efficient_train.models import Llama, ModelConfig, moe
from efficient_train.models.llama.model import MLP

BASE = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, dtype="float32", num_experts=4, experts_per_token=2,
                   moe_intermediate_size=16)


def _block(cfg: ModelConfig) -> moe.MoE:
    with nnx.use_eager_sharding(False):
        shared = MLP(cfg, rngs=nnx.Rngs(1), size=cfg.shared_experts * cfg.expert_size) if cfg.shared_experts else None
        return moe.MoE(cfg, rngs=nnx.Rngs(0), shared=shared)


def _apply(block: moe.MoE, x: jax.Array) -> tuple[jax.Array, moe.Stats]:
    """The block's forward, jitted (one compile instead of one per eager op)."""
    graphdef, state = nnx.split(block)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def _reference(block: moe.MoE, x: np.ndarray) -> np.ndarray:
    """Each token through its top-k experts one at a time, in float64 numpy."""
    cfg = block.cfg
    router = np.asarray(block.router.get_value(), np.float64)
    gate, up, down = (np.asarray(p.get_value(), np.float64) for p in (block.experts.gate, block.experts.up,
                                                                       block.experts.down))
    out = np.zeros_like(x, np.float64)
    for t, token in enumerate(np.asarray(x, np.float64)):
        logits = token @ router
        if cfg.router == "softmax_topk":
            scores = np.exp(logits - logits.max())
            scores /= scores.sum()
        else:
            scores = 1 / (1 + np.exp(-logits))
        choice = scores.copy()
        if cfg.router_groups:  # DeepSeek V3: a group scores its two best experts; keep the best groups
            grouped = choice.reshape(cfg.router_groups, -1)
            group_scores = np.sort(grouped, axis=1)[:, -2:].sum(axis=1)
            dropped = np.argsort(-group_scores, kind="stable")[cfg.router_topk_groups:]
            grouped[dropped] = -np.inf
            choice = grouped.reshape(-1)
        chosen = np.argsort(-choice, kind="stable")[:cfg.experts_per_token]
        weights = scores[chosen]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum()
        for e, w in zip(chosen, weights * cfg.routed_scaling):
            g = token @ gate[e]
            out[t] += w * ((g / (1 + np.exp(-g))) * (token @ up[e])) @ down[e]
    return out


@pytest.mark.parametrize("fields", [
    {},  # Mixtral: softmax, top 2, renormalized
    {"norm_topk_prob": False, "experts_per_token": 3},  # Qwen 3 MoE with norm_topk_prob off
    {"router": "sigmoid_topk", "routed_scaling": 2.5},  # DeepSeek V3
    # DeepSeek V3's group-limited routing: 8 experts in 4 groups, 3 chosen among the best 2 groups.
    {"router": "sigmoid_topk", "num_experts": 8, "experts_per_token": 3, "router_groups": 4, "router_topk_groups": 2},
], ids=["softmax_norm", "softmax_raw", "sigmoid", "sigmoid_groups"])
def test_moe_block_matches_a_per_token_reference(fields):
    cfg = dataclasses.replace(BASE, scan_layers=False, **fields)
    block = _block(cfg)
    x = jax.random.normal(jax.random.key(3), (2, 8, cfg.hidden_size), jnp.float32)
    y, stats = _apply(block, x)
    np.testing.assert_allclose(np.asarray(y).reshape(16, -1), _reference(block, np.asarray(x).reshape(16, -1)),
                               rtol=2e-5, atol=2e-5)
    assert float(jnp.sum(stats["load"])) == 16 * cfg.experts_per_token
    assert float(stats["dropped"]) == 0


def test_shared_experts_add_a_dense_mlp():
    cfg = dataclasses.replace(BASE, scan_layers=False, shared_experts=2)
    block = _block(cfg)
    x = jax.random.normal(jax.random.key(4), (1, 8, cfg.hidden_size), jnp.float32)
    y, _ = _apply(block, x)
    routed = _reference(block, np.asarray(x)[0])
    shared = np.asarray(block.shared(x))[0]
    assert block.shared.gate.kernel.get_value().shape == (32, 2 * 16)
    np.testing.assert_allclose(np.asarray(y)[0], routed + shared, rtol=2e-5, atol=2e-5)


def test_capacity_mode_drops_what_overflows_and_counts_it():
    dropless = _block(dataclasses.replace(BASE, scan_layers=False))
    x = jax.random.normal(jax.random.key(5), (1, 32, BASE.hidden_size), jnp.float32)
    y, stats = dropless(x)
    roomy = dropless  # the same weights, in capacity mode
    roomy.cfg = dataclasses.replace(BASE, capacity_factor=4.0)
    y_roomy, stats_roomy = _apply(roomy, x)
    np.testing.assert_allclose(np.asarray(y_roomy), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert float(stats_roomy["dropped"]) == 0

    tight_cfg = dataclasses.replace(BASE, capacity_factor=0.5)
    tight = dropless
    tight.cfg = tight_cfg
    capacity = moe.capacity(tight_cfg, 32)
    assert capacity == 8  # ceil(0.5 * 32 * 2 / 4)
    _, stats_tight = _apply(tight, x)
    expected = np.maximum(np.asarray(stats["load"]) - capacity, 0).sum()
    assert expected > 0 and float(stats_tight["dropped"]) == expected


def test_parameter_count_and_router_statistics_of_both_layouts():
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    for scan in (True, False):
        cfg = dataclasses.replace(BASE, scan_layers=scan)
        with nnx.use_eager_sharding(False):
            model = nnx.eval_shape(lambda cfg=cfg: Llama(cfg, rngs=nnx.Rngs(0)))
        assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.num_params()

        graphdef, state = nnx.split(model)

        def forward(state, ids, graphdef=graphdef):
            with moe.collecting() as sink:
                nnx.merge(graphdef, state)(ids)
            return sink[0]

        stats = jax.eval_shape(forward, state, ids)
        assert {name: s.shape for name, s in stats.items()} == {
            "load": (2, 4), "prob_sum": (2, 4), "z_sum": (2,), "tokens": (2,), "dropped": (2,)}


def test_first_dense_layers_and_active_flops():
    cfg = dataclasses.replace(BASE, scan_layers=False, first_dense_layers=1, num_layers=3)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    assert not isinstance(model.blocks[0].mlp, moe.MoE) and isinstance(model.blocks[1].mlp, moe.MoE)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.num_params()
    dense = dataclasses.replace(BASE, num_experts=0, intermediate_size=2 * 16)
    # Active parameters: two experts of 16 are one MLP of 32, plus the router's 32 x 4 per layer.
    assert BASE.flops_per_token(64) - dense.flops_per_token(64) == 6 * 2 * 32 * 4


@pytest.mark.parametrize(("field", "value", "message"), [
    ("model.experts_per_token", 5, "model.experts_per_token: 5 must be an integer from 1 to model.num_experts=4"),
    ("model.router", "top1", "model.router: 'top1' is not one of"),
    ("model.first_dense_layers", 1, "model.first_dense_layers: dense and MoE layers differ in structure"),
    ("model.capacity_factor", -1.0, "model.capacity_factor: -1.0 must be a finite number >= 0"),
    ("moe.balance_scope", "batch", "moe.balance_scope"),
    ("model.router_groups", 3, "model.router_groups: 3 must divide model.num_experts=4"),
    ("model.router_topk_groups", 1, "model.router_topk_groups: set only with model.router_groups > 0"),
])
def test_bad_moe_fields_are_one_line_naming_the_field(field, value, message):
    c = default_config()
    c.model.update(num_experts=4, experts_per_token=2)
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_fields(c)


def test_group_limited_routing_keeps_each_token_in_its_best_groups():
    """16 experts in 8 groups, the best 3 kept, 6 chosen: every token's experts lie in at most 3
    groups, and they are the 6 best of those groups' experts; choosing more experts than the kept
    groups hold, or keeping more groups than there are, is refused in one line."""
    cfg = dataclasses.replace(BASE, router="sigmoid_topk", num_experts=16, experts_per_token=6, router_groups=8,
                              router_topk_groups=3)
    logits = jax.random.normal(jax.random.key(7), (64, 16))
    _, ids, _ = moe.route(cfg, logits)
    ids = np.asarray(ids)
    assert max(len(set(row // 2)) for row in ids) <= 3
    scores = np.asarray(jax.nn.sigmoid(logits))
    for row, token_scores in zip(ids, scores):
        groups = set(row // 2)
        allowed = [e for e in range(16) if e // 2 in groups]
        best = sorted(allowed, key=lambda e: -token_scores[e])[:6]
        assert set(row) == set(best)
    c = default_config()
    c.model.update(num_experts=8, experts_per_token=5, router_groups=4, router_topk_groups=2)
    with pytest.raises(ConfigError, match=r"model\.experts_per_token: 5 exceeds the experts of "
                                          r"model\.router_topk_groups=2 groups \(4\)"):
        validate_fields(c)
    c.model.update(experts_per_token=2, router_topk_groups=5)
    with pytest.raises(ConfigError, match=r"model\.router_topk_groups: 5 must be an integer from 1 to "
                                          r"model\.router_groups=4"):
        validate_fields(c)


def test_expert_axis_must_divide_the_experts():
    c = default_config()
    c.model.update(num_experts=6, experts_per_token=2)
    c.mesh.update(data=2, expert=4)
    with pytest.raises(ConfigError, match="mesh.expert: 4 must divide model.num_experts=6"):
        validate(c, 8, check_paths=False)


def test_sharding_plan_splits_experts_over_expert_and_zero_over_the_rest():
    """data=2 x expert=4, ZeRO-3: an expert weight's experts are split 4 ways by `expert` and its ZeRO
    group is `data` alone (it is summed over data only); dense weights and the router are ZeRO-split
    over data x expert; nothing is replicated where a stage promises a shard."""
    from efficient_train.parallel.mesh import make_mesh
    from efficient_train.parallel.sharding import BATCH_AXES, plan_sharding

    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Llama(BASE, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    plan = plan_sharding(params, make_mesh({"data": 2, "expert": 4}, jax.devices()[:8]), zero_stage=3)
    specs = plan.named(plan.param_specs())
    experts = plan.leaves["blocks"]["mlp"]["experts"]
    for name in ("gate", "up", "down"):
        leaf = experts[name]
        assert leaf.zero_axes == ("data",) and leaf.reduce_axes(BATCH_AXES) == ("replica", "data")
        shard = specs["blocks"]["mlp"]["experts"][name].shard_shape(leaf.shape)
        assert shard[1] == BASE.num_experts // 4 and np.prod(shard) * 8 == np.prod(leaf.shape)
    for leaf in (plan.leaves["blocks"]["mlp"]["router"], plan.leaves["blocks"]["attn"]["q"]["kernel"]):
        assert leaf.zero_axes == ("data", "expert") and "expert" in leaf.reduce_axes(BATCH_AXES)


def test_selection_bias_picks_experts_but_never_weighs_them():
    """DeepSeek V3's auxiliary-loss-free bias: it changes which experts are chosen, not their weights."""
    cfg = dataclasses.replace(BASE, router="sigmoid_topk", norm_topk_prob=False, router_bias_update=0.01)
    logits = jax.random.normal(jax.random.key(6), (16, 4))
    bias = jnp.asarray([0.0, 0.0, 0.0, 10.0])
    weights, ids, _ = moe.route(cfg, logits, bias)
    assert (np.asarray(ids) == 3).any(axis=1).all()  # expert 3 is always among the two chosen
    np.testing.assert_allclose(np.asarray(weights), np.take_along_axis(np.asarray(jax.nn.sigmoid(logits)),
                                                                       np.asarray(ids), axis=1), rtol=1e-6)
    with nnx.use_eager_sharding(False):
        block = nnx.eval_shape(lambda: moe.MoE(cfg, rngs=nnx.Rngs(0)))
    assert block.router_bias.get_value().shape == (4,)
    assert dataclasses.replace(cfg, scan_layers=False).num_params() == BASE.num_params() + 2 * 4
