"""A user's own Flax NNX model for the ZeRO-3 tests: a stack of equal dense layers.

Not Llama and not aware of ZeRO: its parameters have no logical names and it reads
them as any NNX module does (`nnx.Linear` reads `kernel[...]`, `bias[...]`), so the
trainer's gather-at-read path is what shards it. `step_memory` compiles the real
train step on abstract inputs and returns per-device bytes from `memory_analysis()`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class DenseStack(nnx.Module):
    """`layers` x (Linear(width, width) then tanh), then a linear head to one output."""

    def __init__(self, width: int, layers: int, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)[..., 0]


def squared_error(model: DenseStack, batch: dict) -> tuple[jax.Array, jax.Array]:
    error = model(batch["x"]) - batch["y"]
    return jnp.sum(error * error), jnp.asarray(error.size, jnp.float32)


def make_model(width: int, layers: int, seed: int = 0) -> DenseStack:
    with nnx.use_eager_sharding(False):
        return DenseStack(width, layers, nnx.Rngs(seed))


def batches(width: int, rows: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(rows, width)).astype(np.float32)
        yield {"x": x, "y": np.sin(x.sum(axis=1)).astype(np.float32)}


def config(zero_stage: int, rows: int):
    from efficient_train import get_config

    c = get_config()
    c.mesh.data = -1
    c.zero_stage = zero_stage
    c.train.update(steps=5, batch_size=rows, learning_rate=1e-2, warmup_steps=1)
    return c


def step_memory(width: int, layers: int, rows: int, zero_stage: int = 3) -> dict[str, int]:
    """Per-device bytes of the compiled train step of a DenseStack on all devices (data axis)."""
    from efficient_train.config import validate
    from efficient_train.parallel.mesh import make_mesh
    from efficient_train.train.memory import memory_record
    from efficient_train.train.step import build_train_step, compiler_options
    from efficient_train.train.training_setup import build_setup

    c = config(zero_stage, rows)
    mesh = make_mesh(validate(c, jax.device_count(), check_paths=False))
    setup = build_setup(c, mesh, model=make_model(width, layers), loss_fn=squared_error)
    example = {"x": jax.ShapeDtypeStruct((rows, width), jnp.float32), "y": jax.ShapeDtypeStruct((rows,), jnp.float32)}
    step = build_train_step(setup.step_def, setup.state_shardings, example)
    compiled = step.lower(setup.abstract_state, setup.abstract_batch(example)).compile(
        compiler_options=compiler_options(setup.step_def))
    record = memory_record(setup, compiled)
    record["all_gathers"] = compiled.as_text().count(" all-gather(") + compiled.as_text().count(" all-gather-start(")
    return record
