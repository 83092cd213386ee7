"""Remat and offload policies (models/remat.py): where the saved activations live, how much
memory each policy's compiled backward takes, and that none of them changes the math.

On a CPU an offload policy compiles to its save_* twin (XLA:CPU lowers the moves to host
as no-ops), so placement is read from the program lowered for CUDA, which a CPU can
produce: every residual the policy names is annotated `pinned_host` on the way out and
`device` on the way back.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_train.models import Llama, ModelConfig
from efficient_train.models.choices import REMAT_POLICIES
from tests.support.zero_setup import run_losses

PLACEMENT = re.compile(r'_xla_buffer_placement = "(\w+)".*-> tensor<([0-9x]+)x\w+>')


def cfg(remat: str, **sizes) -> ModelConfig:
    dims = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8) | sizes
    return ModelConfig(**dims, remat=remat, dtype="float32", param_dtype="float32", attention_impl="xla")


def grad_fn(config: ModelConfig):
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def loss(st, ids):
        logits = nnx.merge(graphdef, st)(ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.roll(ids, -1, 1)[..., None], -1))

    return jax.jit(jax.value_and_grad(loss)), state


def placements(policy: str) -> list[tuple[str, str]]:
    """(memory kind, tensor shape) of each placement annotation in the grad program lowered for CUDA."""
    fn, state = grad_fn(cfg(policy))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    text = fn.trace(state, ids).lower(lowering_platforms=("cuda",)).as_text()
    return PLACEMENT.findall(text)


Q, KV = "2x16x4x8", "2x16x2x8"  # [batch, seq, heads, head_dim] of q and of k, v


@pytest.mark.parametrize("policy, offloaded", [
    ("offload_qkv", [Q, KV, KV]),
    ("offload_attention", [Q, KV, KV, Q, "2x16x32"]),  # + attention's output [.., heads, head_dim], o's [.., hidden]
    # Every projection but `down`: the residual add after it needs no values for its backward.
    ("offload_dots", [Q, KV, KV, "2x16x32", "2x16x64", "2x16x64"]),
    ("save_qkv", []),
])
def test_offload_policy_places_its_residuals_in_pinned_host(policy, offloaded):
    found = placements(policy)
    to_host = sorted(shape for kind, shape in found if kind == "pinned_host")
    back = sorted(shape for kind, shape in found if kind == "device")
    assert to_host == sorted(offloaded) and back == sorted(offloaded), found


def test_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="model.remat"):
        cfg("save_everything")


# --- slow: compiled memory per policy, equal math, training -------------------------

@functools.cache
def compiled_grads(policy: str):
    """(temp bytes, loss, grads) of one policy: 8 layers, 16 x 32 tokens, saved activations dominating."""
    config = cfg(policy, num_layers=LAYERS, hidden_size=64, intermediate_size=256, head_dim=16)
    fn, state = grad_fn(config)
    with nnx.use_eager_sharding(False):
        params = nnx.state(Llama(config, rngs=nnx.Rngs(3)))
    ids = jax.random.randint(jax.random.key(1), (ROWS, SEQ), 0, 256, dtype=jnp.int32)
    compiled = fn.lower(params, ids).compile()
    (loss, grads) = compiled(params, ids)
    return compiled.memory_analysis().temp_size_in_bytes, loss, grads


LAYERS, ROWS, SEQ = 8, 16, 32


@pytest.mark.slow
def test_policies_order_temp_memory_as_designed():
    temp = {policy: compiled_grads(policy)[0] for policy in REMAT_POLICIES}
    ladder = ["none", "save_dots", "save_attention", "save_qkv", "full"]
    assert all(temp[a] > temp[b] for a, b in zip(ladder, ladder[1:])), temp
    # q, k, v of every layer but the one being recomputed: (heads + 2 kv heads) x head_dim per token.
    qkv_bytes = ROWS * SEQ * (4 + 2 * 2) * 16 * 4
    assert temp["save_qkv"] - temp["full"] >= (LAYERS - 1) * qkv_bytes, temp
    for twin in ("dots", "attention", "qkv"):  # on a CPU the moves to host are no-ops
        assert temp[f"offload_{twin}"] == temp[f"save_{twin}"], temp


@pytest.mark.slow
def test_policies_leave_loss_and_gradients_unchanged():
    _, loss, grads = compiled_grads("none")
    for policy in REMAT_POLICIES[1:]:
        _, other_loss, other_grads = compiled_grads(policy)
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)


@pytest.mark.slow
def test_training_with_offload_matches_no_offload():
    reference, _ = run_losses({"model.remat": "none"})
    offloaded, _ = run_losses({"model.remat": "offload_attention"})
    np.testing.assert_allclose(offloaded, reference, rtol=1e-5)
