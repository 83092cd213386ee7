"""Asynchronous saves: `save()` returns while the bytes are still being written, and a
new save first waits for the one in flight (two never overlap). A failed write surfacing
at the next save is tested with a real write error in test_checkpoint_processes.py."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.checkpoint import Checkpointer
from efficient_train.checkpoint.verify import verify_step

SAVING = dict(model={}, mesh={"data": 8}, zero_stage=3, optimizer={}, data=None, seed=0)


def test_save_returns_before_the_commit_and_saves_never_overlap(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    # 128 MiB: writing it takes far longer than returning from save() does.
    states = [{"w": jax.device_put(jnp.full((8, 4 << 20), step, jnp.float32), sharding)} for step in (1, 2)]
    checkpointer = Checkpointer(str(tmp_path), keep=0, keep_every=0, async_save=True)
    checkpointer.save(1, states[0], **SAVING)
    assert checkpointer.steps() == []  # training goes on while step 1 is written
    checkpointer.save(2, states[1], **SAVING)
    assert checkpointer.steps() == [1]  # step 2 started only once step 1 was committed
    checkpointer.wait()
    assert checkpointer.steps() == [1, 2]
    for step in (1, 2):
        assert verify_step(os.path.join(str(tmp_path), str(step))) == []
        restored, _ = checkpointer.restore_step(step, states[0], model={})
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(states[step - 1]["w"]))
    checkpointer.close()
