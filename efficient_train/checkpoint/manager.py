"""Saving and restoring TrainStates: atomic, asynchronous, verified, on any mesh.

Orbax does the heavy lifting: each step is one directory written under a temporary
name and renamed when complete (so a crash leaves no half-listed step, and leftovers
are cleaned at the next start), arrays go to OCDBT in their canonical global form,
saves run in a background thread, a new save first waits for the previous one (two
never overlap) and re-raises its error, and every process of a multi-process run
writes its own shards. Retention moves an old step out of the listing by a rename
before its files are deleted, so a kill mid-deletion never leaves a listed ruin.

On top of that this module adds `metadata.json` (metadata.py) with a fingerprint per
leaf (fingerprint.py), written as one more item of the same Orbax step so it commits
with the arrays. Its fingerprints are started right after Orbax has taken its copy of
the arrays (device programs dispatched, or, on CPU devices, numpy views of the blocks
taken) and are finished in Orbax's background commit, so `save()` holds training only
for that copy and a few dispatches. Restore verifies every leaf and, when the newest
step is damaged, says so loudly and falls back to the previous step that verifies.
Steps written leaf by leaf by tools (writer.py) restore the same way.

Restoring builds its targets from the *current* program's abstract state (shapes,
dtypes and shardings of this mesh), so any mesh loads any checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from efficient_train.checkpoint.fingerprint import start_fingerprints
from efficient_train.checkpoint.verify import describe, verify_step
from efficient_train.checkpoint.metadata import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMetadata,
    CheckpointWriteError,
    DamagedCheckpoint,
    LeafRecord,
    check_model_matches,
)

log = logging.getLogger(__name__)

STATE_ITEM = "state"
METADATA_ITEM = "metadata"
METADATA_FILE = "metadata.json"
TRASH_DIR = "_deleted"


class _DeferredJsonHandler(ocp.JsonCheckpointHandler):
    """`metadata.json` produced inside the background commit, not when the save starts.

    Its fingerprints are finished here (device sums fetched, or host blocks summed),
    in the commit's own thread while Orbax writes the arrays, so training is not held
    for them. The step is committed only after this file is written.
    """

    async def async_save(self, directory: Any, item: Any = None, args: Any = None) -> list:
        async def write() -> None:
            content = json.dumps(args.produce())
            if jax.process_index() == 0:
                (directory / METADATA_FILE).write_text(content)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="efficient_train_metadata")]


# Orbax builds a handler's registry entry only for handlers with restore args too;
# restoring reads metadata.json directly (read_metadata), never through these args.
@ocp.args.register_with_handler(_DeferredJsonHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class _DeferredJsonSave(ocp.args.CheckpointArgs):
    produce: Callable[[], dict]


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """("params/blocks/attn/q/kernel", leaf) pairs, a stable name per leaf."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        out.append(("/".join(parts), leaf))
    return out


def metadata_path(step_dir: str) -> str:
    return os.path.join(step_dir, METADATA_ITEM, METADATA_FILE)


def read_metadata(step_dir: str) -> CheckpointMetadata:
    path = metadata_path(step_dir)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise DamagedCheckpoint(f"{path}: unreadable ({error})") from None
    return CheckpointMetadata.from_json(raw)


def without_optimizer(state: Any) -> dict:
    """The leaves of a params-only checkpoint (`optimizer` None in its metadata)."""
    return {"step": state.step, "params": state.params, "skipped_steps": state.skipped_steps}


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, keep_every: int, async_save: bool) -> None:
        self.directory = os.path.abspath(directory)
        self._async = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            # Retention renames a step out of the listing first (atomic), then we delete
            # it: deleting in place could leave a listed, half-deleted step on SIGKILL.
            todelete_subdir=TRASH_DIR,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                # Uncompressed: optimizer states and weights barely compress, and zstd
                # would cost more time than the bytes it saves.
                STATE_ITEM: ocp.PyTreeCheckpointHandler(use_compression=False),
                METADATA_ITEM: _DeferredJsonHandler(filename=METADATA_FILE),
            },
        )
        self._writing: int | None = None  # the step of the save in flight
        self._empty_trash()

    def _empty_trash(self) -> None:
        trash = os.path.join(self.directory, TRASH_DIR)
        if jax.process_index() == 0 and os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

    def steps(self) -> list[int]:
        """The committed steps, read from the directory: a step's directory gets its final
        name only when it is complete. (Orbax's own list also holds a save still in flight.)"""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory)
                      if name.isdigit() and os.path.isdir(os.path.join(self.directory, name)))

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, *, model: dict, mesh: dict, zero_stage: int, optimizer: dict,
             data: dict | None, seed: int) -> None:
        """Start saving `state` as step `step`; returns once the bytes are being written.

        Waits for the previous save first, and raises CheckpointWriteError if that one
        failed (this step is then not started).
        """
        self.wait()
        self._empty_trash()
        paths, arrays = zip(*leaf_paths(state))
        # An async save starts the fingerprints once Orbax has taken its copy of the
        # arrays, so that copy does not compete with them, and its background commit
        # finishes them. A sync save commits inside `_manager.save`: start first.
        fetch_fingerprints: concurrent.futures.Future = concurrent.futures.Future()
        if not self._async:
            fetch_fingerprints.set_result(start_fingerprints(arrays))

        def metadata_json() -> dict:
            leaves = {
                path: LeafRecord(tuple(leaf.shape), str(leaf.dtype), fingerprint)
                for path, leaf, fingerprint in zip(paths, arrays, fetch_fingerprints.result()())
            }
            return CheckpointMetadata(FORMAT_VERSION, step, model, mesh, zero_stage, optimizer, data, seed, leaves).to_json()

        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.PyTreeSave(state), METADATA_ITEM: _DeferredJsonSave(metadata_json)}
                ),
                force=True,
            )
            self._writing = step
            if not fetch_fingerprints.done():
                fetch_fingerprints.set_result(start_fingerprints(arrays))
        except BaseException as error:  # never leave a background commit waiting
            if not fetch_fingerprints.done():
                fetch_fingerprints.set_exception(error)
            if not self._async and isinstance(error, Exception):  # a sync save writes inside save()
                raise self._write_error(step, error) from error
            raise

    def wait(self) -> None:
        """Block until the background save is committed; raises CheckpointWriteError if it failed."""
        step, self._writing = self._writing, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(step, error) from error

    def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return CheckpointWriteError(f"step {step} was not saved, writing it failed "
                                    f"(newest saved step: {max(self.steps(), default=None)}): {detail}")

    def close(self) -> None:
        self._manager.close()

    def restore_step(self, step: int, abstract_state: Any, *, model: dict) -> tuple[Any, CheckpointMetadata]:
        """Restore one step onto `abstract_state`'s shardings and verify every leaf.

        A params-only checkpoint (converted with --drop_optimizer, or imported from
        Hugging Face) restores with `opt_state=None`; the caller starts a fresh one.
        """
        metadata = read_metadata(self.step_dir(step))
        check_model_matches(metadata.model, model)
        params_only = metadata.optimizer is None
        target = without_optimizer(abstract_state) if params_only else abstract_state
        expected = {path: (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaf_paths(target)}
        saved = {path: (record.shape, record.dtype) for path, record in metadata.leaves.items()}
        if expected != saved:
            differing = sorted(set(expected.items()) ^ set(saved.items()))[:5]
            raise CheckpointError(f"step {step}: the state's leaves do not match the checkpoint's, e.g. {differing}")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.PyTreeRestore(
                            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        )
                    }
                ),
            )[STATE_ITEM]
        except Exception:  # corrupt or missing files surface as many error types: name the leaves
            problems = verify_step(self.step_dir(step))
            detail = describe(problems) if problems else "orbax could not restore it, though every leaf reads back"
            raise DamagedCheckpoint(f"step {step}: damaged leaves: {detail}") from None
        paths, arrays = zip(*leaf_paths(restored))
        damaged = [
            path for path, fingerprint in zip(paths, start_fingerprints(arrays)())
            if fingerprint != metadata.leaves[path].fingerprint
        ]
        if damaged:
            raise DamagedCheckpoint(f"step {step}: damaged leaves (fingerprint mismatch): {', '.join(damaged)}")
        if params_only:
            restored = abstract_state.replace(opt_state=None, **restored)
        return restored, metadata

    def restore_latest(self, abstract_state: Any, *, model: dict) -> tuple[Any, CheckpointMetadata] | None:
        """The newest step that verifies; damaged newer steps are reported and skipped."""
        for step in reversed(self.steps()):
            try:
                return self.restore_step(step, abstract_state, model=model)
            except DamagedCheckpoint as error:
                log.warning("CHECKPOINT DAMAGED, falling back to the previous step: %s", error)
                print(f"WARNING: checkpoint damaged, falling back to the previous step: {error}", flush=True)
        return None
