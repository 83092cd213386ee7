"""A process that updates a sharded state and saves it asynchronously after every step:
the target of the SIGKILL test in test_checkpoint_processes.py.

    python -m tests.support.async_save_worker DIR [--hold PHASE --at STEP --signal FILE] [--last STEP]

Run with 8 simulated devices (the caller sets XLA_FLAGS). It stands in for a training
job without the cost of one: the update donates its input buffers, as the trainer's step
does, so the save must have copied them before `save()` returns. On start it resumes
from the newest step that verifies and checks that the restored state is bit for bit the
state that step's update made (replayed from the start); then it prints "resumed N"
(0: fresh) and "saving N" as each save starts. A mismatch exits with status 3.
`--last STEP` stops once STEP is committed and retention settled (close(), exit 0);
otherwise it runs until killed.

`--hold PHASE --at STEP` makes the kill land at a known moment of the save of STEP:
when that save reaches PHASE, the worker writes FILE (atomically: "PHASE STEP detail")
and blocks the thread that got there for good, so the save stays exactly there until
the test sends SIGKILL. The phases, in the order a save passes them:

  arrays       the step's array writes begin (its temporary directory exists)
  metadata     metadata.json is produced in the background commit, beside the array writes
  item_commit  the arrays are written; their item directory is about to be renamed into
               place inside the step's temporary directory
  step_commit  everything is written (commit_success.txt too); only the rename that
               commits the step is left
  committed    the step was just renamed into place (not yet read back and verified)
  trash        retention deletes a retired step from the trash, half its files gone; this
               happens in the first save at or after STEP that deletes, whose step the
               signal names

The holds wrap Orbax's and our functions from here (no hook in the library): Orbax's
array serialization and its directory rename, the fingerprint start of
`efficient_train.checkpoint.manager`, and `shutil.rmtree`. If a newer Orbax moves one of
them, installing the hold fails (or it is never reached, and the test says so).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.checkpoint import Checkpointer, manager
from efficient_train.checkpoint.metadata import STATE_ITEM

SHAPES = {"params": (512, 1024), "moment": (512, 1024), "codes": (1024, 1024)}  # 6 MiB: a save takes a while
PHASES = ("arrays", "metadata", "item_commit", "step_commit", "committed", "trash")
KEEP = 2  # few kept steps: processes retire steps, so retention and the trash are exercised


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


class Hold:
    """Blocks the thread that reaches (phase, step) for good, once it has written `signal`."""

    def __init__(self, phase: str, step: int, signal: str) -> None:
        self.phase, self.step, self.signal = phase, step, signal
        self.saving: int | None = None  # the step whose save() is running in the main thread

    def reached(self, phase: str, step: int | None, detail: str = "") -> None:
        if phase != self.phase or step != self.step:
            return
        partial = self.signal + ".partial"
        with open(partial, "w") as f:
            f.write(f"{phase} {step} {detail}".strip() + "\n")
        os.replace(partial, self.signal)  # the test never reads half a signal
        threading.Event().wait()  # until SIGKILL


def install(hold: Hold, directory: str) -> None:
    """Wrap the functions a save passes through (see the module docstring)."""
    from orbax.checkpoint._src.path import async_path
    from orbax.checkpoint._src.serialization import serialization

    serialize = serialization.async_serialize_from_host
    rename = async_path.rename
    start_fingerprints = manager.start_fingerprints
    rmtree = shutil.rmtree
    directory = os.path.abspath(directory)
    trash = os.path.join(directory, manager.TRASH_DIR) + os.sep
    # A step's directory, under its final name or Orbax's temporary one ("7.orbax-checkpoint-tmp").
    step_path = re.compile(re.escape(directory) + r"/(\d+)(\.orbax-checkpoint-tmp[^/]*)?(/[^/]+)?")

    def step_of(text: str, item: str | None = None) -> int | None:
        """The step whose directory (or, with `item`, whose item directory) `text` names."""
        found = step_path.search(text)
        if not found or (item is not None and (found.group(3) or "").split(".")[0] != "/" + item):
            return None
        return int(found.group(1))

    async def serialize_held(rslices, tensorstore_spec, *args, **kwargs):
        hold.reached("arrays", step_of(json.dumps(tensorstore_spec, default=str)))
        return await serialize(rslices, tensorstore_spec, *args, **kwargs)

    async def rename_held(src, dst):
        committing = str(dst) if os.path.dirname(str(dst)) == directory else ""  # the step's own rename
        hold.reached("item_commit", step_of(str(dst), item=STATE_ITEM))
        hold.reached("step_commit", step_of(committing))
        result = await rename(src, dst)
        hold.reached("committed", step_of(committing))
        return result

    def start_fingerprints_held(arrays, **kwargs):
        step = hold.saving  # called inside save(step); the returned function runs in its commit
        finish = start_fingerprints(arrays, **kwargs)

        def finish_held():
            hold.reached("metadata", step)
            return finish()

        return finish_held

    def rmtree_held(path, *args, **kwargs):
        # Retention deletes once a newer step has been read back and verified, in a later save
        # than the one that committed it: held in the first save at or after STEP that deletes.
        if hold.phase == "trash" and (hold.saving or 0) >= hold.step and str(path).startswith(trash):
            files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
            for file in files[: len(files) // 2]:
                os.remove(file)
            hold.step = hold.saving
            hold.reached("trash", hold.saving, f"{os.path.basename(str(path))} {len(files) // 2}/{len(files)}")
        return rmtree(path, *args, **kwargs)

    serialization.async_serialize_from_host = serialize_held
    async_path.rename = rename_held
    manager.start_fingerprints = start_fingerprints_held
    shutil.rmtree = rmtree_held


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--hold", choices=PHASES)
    parser.add_argument("--at", type=int)
    parser.add_argument("--signal")
    parser.add_argument("--last", type=int)
    args = parser.parse_args(argv)
    hold = Hold(args.hold, args.at, args.signal)
    if args.hold:
        install(hold, args.directory)
    mesh = jax.make_mesh((8,), ("data",))
    checkpointer = Checkpointer(args.directory, keep=KEEP, keep_every=0, async_save=True)
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
    for step in range(start + 1, (args.last or 10**9) + 1):
        state = update(state)
        print(f"saving {step}", flush=True)
        hold.saving = step
        checkpointer.save(step, state, model={}, mesh={"data": 8}, zero_stage=3, optimizer={}, data=None, seed=0)
        hold.saving = None
    checkpointer.close()  # the end of a run: the last save committed, retention settled
    print(f"saved {checkpointer.steps()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
