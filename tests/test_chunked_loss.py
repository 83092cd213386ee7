"""The vocabulary-chunked cross-entropy (train/chunked_loss.py) against the whole-logits loss.

Value and gradients of every parameter agree within 1e-5 in fp32 (tied and untied heads, a
loss mask, z-loss and soft-capping, a chunk that does not divide the vocabulary), also
through the real step's shard_map under tensor=2 and sequence=4 on the 8 simulated
devices; the compiled program holds no [tokens, vocab] fp32 buffer and its temp bytes fall.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from efficient_train.config import validate
from efficient_train.data import Batch
from efficient_train.errors import ConfigError
from efficient_train.models import Llama, ModelConfig
from efficient_train.models.llama.model import OutputHead
from efficient_train.parallel.mesh import make_mesh
from efficient_train.train.loss import AUTO_CHUNK, cross_entropy, next_token_loss, resolve_chunk
from efficient_train.train.step import make_local_grads, over_batch_axes
from efficient_train.train.training_setup import build_setup, init_state
from tests.support.hlo_utils import collectives
from tests.support.zero_setup import small_config

B, S, V = 4, 32, 256
CHUNK = 48  # does not divide 256: the last chunk overlaps the one before


def model_and_batch(**overrides) -> tuple[Llama, Batch]:
    cfg = ModelConfig(**(dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=16, dtype="float32", attention_impl="xla") | overrides))
    with nnx.use_eager_sharding(False):
        model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (B, S + 1), 0, V)
    mask = (jax.random.uniform(jax.random.key(2), (B, S)) > 0.3).astype(jnp.float32)
    batch = Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                  positions=jnp.broadcast_to(jnp.arange(S), (B, S)), segment_ids=jnp.ones((B, S), jnp.int32),
                  loss_weights=mask)
    return model, batch


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "z_loss"),
                   compiler_options={"xla_backend_optimization_level": 0})  # tiny programs compile faster
def _mean_loss_and_grads(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, chunk: int,
                         z_loss: float) -> tuple[jax.Array, nnx.State]:
    def mean(params: nnx.State) -> jax.Array:
        total, weight = next_token_loss(nnx.merge(graphdef, params), batch, chunk=chunk, z_loss=z_loss)
        return total / weight
    return jax.value_and_grad(mean)(params)


def loss_and_grads(model: Llama, batch: Batch, chunk: int, z_loss: float = 0.0) -> tuple[float, dict]:
    graphdef, params = nnx.split(model)
    value, grads = _mean_loss_and_grads(graphdef, params, batch, chunk, z_loss)
    return float(value), nnx.to_pure_dict(grads)


def assert_trees_close(actual: dict, expected: dict, tolerance: float = 1e-5) -> None:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.abs(b).max()), 1e-30)
        assert float(np.abs(a - b).max()) / scale < tolerance, jax.tree_util.keystr(path)


@pytest.mark.parametrize("overrides,loss_args", [
    pytest.param(dict(tie_embeddings=True), {}, marks=pytest.mark.slow),
    (dict(tie_embeddings=False, final_softcap=3.0), dict(z_loss=1e-3)),
], ids=["tied", "untied-softcap-zloss"])
def test_chunked_equals_full_loss_and_gradients(overrides, loss_args) -> None:
    model, batch = model_and_batch(**overrides)
    full_value, full_grads = loss_and_grads(model, batch, chunk=0, **loss_args)
    value, grads = loss_and_grads(model, batch, chunk=CHUNK, **loss_args)
    assert abs(value - full_value) <= 1e-5 * abs(full_value)
    assert_trees_close(grads, full_grads)
    # The mask is honoured: a masked token's target does not change the chunked loss at all.
    changed = batch.replace(targets=jnp.where(batch.loss_weights == 0, (batch.targets + 1) % V, batch.targets))
    assert loss_and_grads(model, changed, chunk=CHUNK, **loss_args)[0] == value


def test_vocab_shards_change_nothing_but_the_layout() -> None:
    """The per-shard running max/sum combined over the shard axis equals the one-shard loop."""
    h = jax.random.normal(jax.random.key(0), (64, 32))
    head = OutputHead(jax.random.normal(jax.random.key(1), (V, 32)), True, jnp.dtype(jnp.float32), 0.0)
    targets = jax.random.randint(jax.random.key(2), (64,), 0, V)
    losses = jax.jit(functools.partial(cross_entropy, head=head, targets=targets), static_argnames=("chunk", "vocab_shards"))
    full = losses(h)
    for shards, chunk in ((2, 40), (4, 64), (8, 1000)):
        np.testing.assert_allclose(losses(h, chunk=chunk, vocab_shards=shards), full, rtol=1e-6)


def test_compiled_program_holds_no_full_logits() -> None:
    """From the compiled CPU program: the whole loss makes f32[tokens, vocab] buffers, the
    chunked one none, and its temp bytes fall by more than the logits' size."""
    tokens, hidden, vocab, chunk = 4096, 32, 8192, 1024
    h = jax.ShapeDtypeStruct((tokens, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32)
    targets = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def compiled(chunk: int):
        def loss(h, w, targets):
            return cross_entropy(h, OutputHead(w, True, jnp.dtype(jnp.float32), 0.0), targets, chunk=chunk).sum()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, targets).compile()

    full, chunked = compiled(0), compiled(chunk)
    logits_buffer = re.compile(rf"f32\[{tokens},{vocab}\]")
    assert logits_buffer.search(full.as_text())
    assert not logits_buffer.search(chunked.as_text())
    assert re.search(rf"f32\[{tokens},1,{chunk}\]", chunked.as_text())  # one chunk at a time
    logits_bytes = tokens * vocab * 4
    full_temp, chunked_temp = full.memory_analysis().temp_size_in_bytes, chunked.memory_analysis().temp_size_in_bytes
    assert full_temp >= logits_bytes
    assert chunked_temp < full_temp - logits_bytes
    assert chunked_temp < 4 * tokens * chunk * 4  # a few chunk-sized buffers


def test_auto_chunk_follows_vocabulary_size() -> None:
    assert resolve_chunk(-1, 256) == 0 and resolve_chunk(-1, 128256) == AUTO_CHUNK
    assert resolve_chunk(0, 128256) == 0 and resolve_chunk(100, 256) == 100


def step_grads(mesh_axes: dict, zero_stage: int, loss_chunk: int) -> tuple[float, dict, str]:
    """The loss, the reduced gradients and the compiled HLO of the real step's shard_map on 8 devices."""
    config = small_config(**{f"mesh.{k}": v for k, v in mesh_axes.items()},
                          **{"train.loss_chunk": loss_chunk, "model.hidden_size": 32, "model.intermediate_size": 64,
                             "model.num_heads": 2, "model.num_kv_heads": 2, "model.num_layers": 1,
                             "model.tie_embeddings": False, "train.batch_size": 8, "zero_stage": zero_stage})
    mesh = make_mesh(validate(config, jax.device_count(), check_paths=False))
    setup = build_setup(config, mesh)
    state = init_state(setup)
    model, batch = model_and_batch()
    batch = Batch(*(jnp.concatenate([x, x]) for x in (batch.inputs, batch.targets, batch.positions,
                                                       batch.segment_ids, batch.loss_weights)))
    plan = setup.plan
    local = over_batch_axes(make_local_grads(setup.step_def), setup.step_def, batch,
                            (plan.manual_grad_specs(), P(), P(), P()))
    compiled = jax.jit(local).lower(state.params, {}, batch).compile()  # {}: no LoRA base
    grads, total, weight, _ = compiled(state.params, {}, batch)  # _: MoE statistics (none here)
    return float(total / weight), grads, compiled.as_text()


@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes,zero_stage", [(dict(data=4, tensor=2), 0), (dict(data=4, tensor=2), 3),
                                                   (dict(data=2, sequence=4), 0)],
                         ids=["tensor2", "tensor2-zero3", "sequence4"])
def test_chunked_equals_full_in_the_step(mesh_axes, zero_stage) -> None:
    """The vocabulary split over tensor (with ZeRO-3's gathered head), or the tokens over sequence."""
    full_loss, full_grads, _ = step_grads(mesh_axes, zero_stage, 0)
    loss, grads, hlo = step_grads(mesh_axes, zero_stage, CHUNK)
    assert abs(loss - full_loss) <= 1e-5 * abs(full_loss)
    assert_trees_close(grads, full_grads)
    if "tensor" in mesh_axes and zero_stage == 0:  # (ZeRO-3 gathers parameters, all_gather attention k/v)
        # Each tensor shard keeps its half of the vocabulary: the compiled step gathers nothing,
        # the shards' log-sum-exps meet in all-reduces of per-token values.
        assert "all-gather" not in {c.op for c in collectives(hlo)}


def test_loss_fields_refused_with_a_custom_loss() -> None:
    config = small_config(**{"train.loss_chunk": 64})
    mesh = make_mesh(validate(config, jax.device_count(), check_paths=False))
    with pytest.raises(ConfigError, match=r"^train\.loss_chunk: 64 applies to the built-in loss only"):
        build_setup(config, mesh, loss_fn=functools.partial(next_token_loss))


@pytest.mark.slow
def test_estimate_of_the_train_step_loses_the_logits() -> None:
    """`estimate` (the compiled train step on 8 devices) for a vocabulary above the auto
    threshold: the default (-1) chunks, and temp falls by more than the fp32 logits' bytes."""
    from efficient_train.train.estimate import estimate_memory

    def temp(loss_chunk: int) -> int:
        config = small_config(**{"train.loss_chunk": loss_chunk, "model.vocab_size": 32768, "model.hidden_size": 32,
                                 "model.intermediate_size": 64, "model.num_heads": 2, "model.num_kv_heads": 2,
                                 "model.num_layers": 1, "train.batch_size": 32, "data.seq_len": 128,
                                 "mesh.data": 8})
        return estimate_memory(config)["per_device_bytes"]["temp"]

    logits_bytes = (32 // 8) * 128 * 32768 * 4  # per device: its 4 rows
    assert temp(-1) < temp(0) - logits_bytes
