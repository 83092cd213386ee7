"""A tiny LoRA run shared by the LoRA tests: config, a fixed batch, steps on any mesh.

The base is initialized from the seed (`init_state` without a base), which gives the
same weights on every mesh, so losses on different meshes are comparable; the
checkpoint tests build a real base with `checkpoint import-hf` instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from efficient_train.config import default_config
from efficient_train.data import Batch
from efficient_train.parallel.mesh import make_mesh

SMALL_MODEL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8)
BATCH, SEQ = 4, 16


def lora_config(rank: int = 4, targets: str = "q,k,v,o,gate,up,down", **fields):
    """The default config with the small model, LoRA of `rank` (0: a full fine-tune), and dotted `fields`."""
    c = default_config()
    c.model.update(SMALL_MODEL)
    c.train.update(dict(batch_size=BATCH, warmup_steps=0, learning_rate=1e-2, schedule="constant"))
    c.data.seq_len = SEQ
    c.optimizer.weight_decay = 0.0
    c.finetune.lora.update(dict(rank=rank, targets=targets))
    if rank:
        c.finetune.base = "unused-by-build_setup"
    for dotted, value in fields.items():
        node = c
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def fixed_batch(seed: int = 0) -> Batch:
    """One batch of random tokens: a task the adapters can learn (memorize) in a few steps."""
    ids = np.random.default_rng(seed).integers(0, SMALL_MODEL["vocab_size"], (BATCH, SEQ + 1))
    return Batch(inputs=jnp.asarray(ids[:, :-1], jnp.int32), targets=jnp.asarray(ids[:, 1:], jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ)),
                 segment_ids=jnp.ones((BATCH, SEQ), jnp.int32), loss_weights=jnp.ones((BATCH, SEQ), jnp.float32))


def mesh_of(shape: dict[str, int]):
    """A mesh over the first devices, as many as `shape` needs."""
    full = dict(dict.fromkeys(("replica", "data", "sequence", "tensor"), 1), **shape)
    count = int(np.prod(list(full.values())))
    return make_mesh(full, devices=jax.devices()[:count])


def train_steps(config, mesh, steps: int, hlo: list | None = None):
    """(losses, final state, setup, the frozen base before the first step as numpy) of `steps`
    steps on the fixed batch; the compiled step's HLO text is appended to `hlo` if given."""
    from efficient_train.train.step import build_train_step
    from efficient_train.train.training_setup import build_setup, init_state, lm_batch_shapes

    setup = build_setup(config, mesh)
    state = init_state(setup)
    shapes = lm_batch_shapes(config)
    compiled = build_train_step(setup.step_def, setup.state_shardings, shapes).lower(
        setup.abstract_state, setup.abstract_batch(shapes)).compile()
    if hlo is not None:
        hlo.append(compiled.as_text())
    batch = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), fixed_batch(), setup.abstract_batch(shapes))
    base = jax.tree.map(lambda x: np.array(x, copy=True), state.frozen)  # the step donates the state
    losses = []
    for _ in range(steps):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, setup, base
