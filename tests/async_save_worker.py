"""A process that updates a sharded state and saves it asynchronously after every step,
until it is killed: the target of the SIGKILL test in test_checkpoint_processes.py.

Run as `python -m tests.async_save_worker DIR` with 8 simulated devices (the caller
sets XLA_FLAGS). It stands in for a training job without the cost of one: the update
donates its input buffers, as the trainer's step does, so the save must have copied
them before `save()` returns. On start it resumes from the newest step that verifies
and checks that the restored state is bit for bit the state that step's update made
(replayed from the start); then it prints "resumed N" (0: fresh) and "saving N" as
each save starts. A mismatch exits with status 3.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from efficient_train.checkpoint import Checkpointer

SHAPES = {"params": (512, 1024), "moment": (512, 1024), "codes": (1024, 1024)}  # 6 MiB: a save takes a while


def initial_state(mesh: jax.sharding.Mesh) -> dict:
    sharded = NamedSharding(mesh, P("data"))
    state = {name: jnp.zeros(shape, jnp.int8 if name == "codes" else jnp.float32, device=sharded)
             for name, shape in SHAPES.items()}
    state["step"] = jnp.zeros((), jnp.int32, device=NamedSharding(mesh, P()))
    return state


def _next(state: dict) -> dict:
    step = state["step"] + 1
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), step), SHAPES["params"])
    return {
        "params": state["params"] * 0.9 + noise,
        "moment": state["moment"] + noise * noise,
        "codes": (state["codes"].astype(jnp.int32) + step).astype(jnp.int8),
        "step": step,
    }


update = jax.jit(_next, donate_argnums=0)  # as a training step: the old state's buffers are reused
replay = jax.jit(_next)


def state_at(mesh: jax.sharding.Mesh, step: int) -> dict:
    state = initial_state(mesh)
    for _ in range(step):
        state = replay(state)
    return state


def main(directory: str) -> int:
    mesh = jax.make_mesh((8,), ("data",))
    checkpointer = Checkpointer(directory, keep=4, keep_every=0, async_save=True)
    state = initial_state(mesh)
    restored = checkpointer.restore_latest(state, model={})
    start = 0
    if restored is not None:
        state, metadata = restored
        start = metadata.step
        expected = state_at(mesh, start)
        for name in expected:
            if not np.array_equal(np.asarray(state[name]), np.asarray(expected[name])):
                print(f"restored step {start}: {name} differs from the state that step saved", flush=True)
                return 3
    print(f"resumed {start}", flush=True)
    for step in range(start + 1, 10**9):
        state = update(state)
        print(f"saving {step}", flush=True)
        checkpointer.save(step, state, model={}, mesh={"data": 8}, zero_stage=3, optimizer={}, data=None, seed=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
