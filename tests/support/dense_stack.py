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


class ScannedStack(nnx.Module):
    """The same layers stored stacked ([L, ...] parameters, `nnx.vmap`) and run by `nnx.scan`:
    each read inside the scan sees one layer's slice."""

    def __init__(self, width: int, layers: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> nnx.Linear:
            return nnx.Linear(width, width, rngs=rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x: jax.Array, layer: nnx.Linear) -> jax.Array:
            return jnp.tanh(layer(x))

        return self.head(body(x, self.layers))[..., 0]


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
    c.train.update(steps=5, batch_size=rows, learning_rate=1e-4, warmup_steps=1)
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


def run_losses(zero_stage: int, width: int, layers: int, rows: int, steps: int, scanned: bool = False) -> list[float]:
    import tempfile

    from efficient_train import Trainer

    c = config(zero_stage, rows)
    c.workdir = tempfile.mkdtemp(prefix="efficient_train_test_")
    if scanned:
        with nnx.use_eager_sharding(False):
            model: nnx.Module = ScannedStack(width, layers, nnx.Rngs(0))
    else:
        model = make_model(width, layers)
    trainer = Trainer(c, model=model, loss_fn=squared_error, data=batches(width, rows))
    return [float(trainer.step()["loss"]) for _ in range(steps)]


# The memory-frugal XLA:CPU scheduler: the default (concurrency-optimized, BFS) starts every
# parameter gather as early as its input allows, so all of them are alive at once; a GPU's
# latency-hiding scheduler bounds that prefetch by its memory limit instead.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def measure_in_subprocess(width: int, rows: int, layer_counts: tuple[int, ...], loss_layers: int,
                          steps: int) -> dict:
    """Step memory per layer count (ZeRO-3) and losses (ZeRO-0 and 3) on 8 devices, in a process of its own."""
    import json
    import os
    import subprocess
    import sys

    from tests.support.subprocess_env import subprocess_env

    env = subprocess_env(8)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {CPU_SCHEDULER_FLAG}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = json.dumps({"width": width, "rows": rows, "layer_counts": layer_counts, "loss_layers": loss_layers,
                       "steps": steps})
    out = subprocess.run([sys.executable, "-m", "tests.support.dense_stack", args], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    spec = json.loads(sys.argv[1])
    width, rows = spec["width"], spec["rows"]
    result = {
        "memory": {str(n): step_memory(width, n, rows) for n in spec["layer_counts"]},
        "losses": {str(stage): run_losses(stage, width, spec["loss_layers"], rows, spec["steps"]) for stage in (0, 3)},
    }
    print(json.dumps(result))
