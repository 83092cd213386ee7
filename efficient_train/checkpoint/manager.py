"""Saving and restoring TrainStates: atomic, asynchronous, verified, on any mesh.

Orbax does the heavy lifting: each step is one directory written under a temporary
name and renamed when complete (so a crash leaves no half-listed step, and leftovers
are cleaned at the next start), arrays go to OCDBT in their canonical global form,
saves run in a background thread, a new save first waits for the previous one (two
never overlap) and re-raises its error, and every process of a multi-process run
writes its own shards.

On top of that this module adds `metadata.json` (metadata.py) with a fingerprint per
leaf (fingerprint.py), written as one more item of the same Orbax step so it commits
with the arrays. Its fingerprints are started right after Orbax has taken its copy of
the arrays (device programs dispatched, or, on CPU devices, numpy views of the blocks
taken) and are finished in Orbax's background commit, so `save()` holds training only
for that copy and a few dispatches. Restore verifies every leaf and, when the newest
step is damaged, says so loudly and falls back to the previous step that verifies.
Steps written leaf by leaf by tools (writer.py) restore the same way.

What counts as damage, and what happens to it, is strict, because acting on a wrong
verdict loses data:
- Only proven damage is damage (DamagedCheckpoint): a leaf whose bytes do not match its
  fingerprint, bytes that are missing or cannot be decoded, a metadata.json that is
  missing or not JSON. Any other failure while restoring (an OSError such as EACCES or
  EIO from the filesystem, MemoryError, a newer format version, another model) is
  reported as what it is and stops the run; no step is touched.
- A damaged step is set aside once an older step has verified: renamed to
  `damaged-<step>` (never deleted, never overwritten), which Orbax no longer lists, so
  the run continues past it and saves that step number again.
- When no step verifies, nothing is changed and the run is refused
  (NoVerifiedCheckpoint), naming every step and its problem: starting from scratch is
  the user's explicit choice (move the checkpoint directory away, or point
  `checkpoint.dir` elsewhere).
- Retention (the newest `keep` steps and every `keep_every`-th) deletes an old step
  only after a newer one has been committed *and read back and verified* against its
  fingerprints (in a background thread, on process 0, only when something would be
  deleted). A newer step that does not verify deletes nothing and is reported. An
  expired step is renamed into `_deleted/` first (one atomic step out of the listing,
  so a kill mid-deletion leaves no listed ruin), then deleted there. A `_deleted` that
  is a symlink or a file is refused at start, and deleting never follows a link: a link
  is unlinked, never its target emptied.

Restoring builds its targets from the *current* program's abstract state (shapes,
dtypes and shardings of this mesh), so any mesh loads any checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from efficient_train.checkpoint.fingerprint import start_fingerprints
from efficient_train.checkpoint.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    METADATA_ITEM,
    STATE_ITEM,
    STATE_LAYOUT_FIELDS,
    CheckpointError,
    CheckpointMetadata,
    CheckpointReadError,
    CheckpointWriteError,
    DamagedCheckpoint,
    LeafRecord,
    check_finetune_matches,
    check_model_matches,
    metadata_path,
    read_metadata_file,
)
from efficient_train.checkpoint.verify import describe_problems, verify_step
from efficient_train.errors import RunError, first_line
from efficient_train.tree_paths import leaf_paths

log = logging.getLogger(__name__)

TRASH_DIR = "_deleted"
DAMAGED_PREFIX = "damaged-"


class NoVerifiedCheckpoint(RunError):
    """Every committed step is damaged: the run is refused and nothing is changed."""


# Errors of the machine, not of the bytes: never evidence of damage.
_NOT_DAMAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                      errno.ENOSPC, errno.EROFS, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE}


def _machine_error(error: BaseException | None) -> BaseException | None:
    """The I/O or memory error in `error`'s chain that says the machine failed, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno in _NOT_DAMAGE_ERRNOS):
            return error
        error = error.__cause__ or error.__context__
    return None


def _named_first_line(error: BaseException) -> str:
    """"OSError: <first line>" (the type says what failed, e.g. MemoryError), or the type alone."""
    return f"{type(error).__name__}: {first_line(error, 300)}" if str(error).strip() else type(error).__name__


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



def read_metadata(step_dir: str) -> CheckpointMetadata:
    """The step's metadata; DamagedCheckpoint if it is missing or not JSON (a committed step
    always has it), CheckpointReadError if the filesystem failed to read it."""
    return read_metadata_file(metadata_path(step_dir))


def without_optimizer(state: Any) -> dict:
    """The leaves of a params-only checkpoint (`optimizer` None in its metadata)."""
    return {"step": state.step, "params": state.params, "skipped_steps": state.skipped_steps}


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, keep_every: int, async_save: bool, save_every: int = 0) -> None:
        self.directory = os.path.abspath(directory)
        self._save_every = save_every
        self._trash()  # refuse a `_deleted` link before Orbax could move steps through it
        self._async = async_save
        self._keep, self._keep_every = keep, keep_every
        # Retention is ours, not Orbax's: Orbax deletes old steps once a newer one is
        # committed; we delete them only once a newer one has been read back and verified.
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True,
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
        self._verifier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="efficient_train_verify")
        self._verifying: tuple[int, concurrent.futures.Future] | None = None  # (step, its read-back check)
        self._empty_trash()

    def save_due(self, step: int, *, final: bool) -> bool:
        """Whether the trainer saves after `step`: every `save_every` steps (0: never on a cadence) and at the last step."""
        return final or bool(self._save_every and step % self._save_every == 0)

    def _trash(self) -> str | None:
        """The retention directory, if it exists; refused if it is not a real directory."""
        trash = os.path.join(self.directory, TRASH_DIR)
        try:
            mode = os.lstat(trash).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a directory"
            raise CheckpointError(f"checkpoint.dir: {trash} is {kind}; retention deletes what it holds, so it must be "
                                  "a real directory inside the checkpoint directory: remove it")
        return trash

    def _empty_trash(self) -> None:
        """Delete what retention moved into `_deleted/`: links are unlinked, never followed."""
        trash = self._trash()
        if jax.process_index() != 0 or trash is None:
            return
        for name in os.listdir(trash):
            path = os.path.join(trash, name)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside
            else:
                os.unlink(path)

    def steps(self) -> list[int]:
        """The committed steps of this checkpoint directory (`committed_steps`)."""
        return committed_steps(self.directory)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, *, model: dict, mesh: dict, zero_stage: int, optimizer: dict,
             data: dict | None, seed: int, finetune: dict | None = None) -> None:
        """Start saving `state` as step `step`; returns once the bytes are being written.

        Waits for the previous save first, and raises CheckpointWriteError if that one
        failed (this step is then not started).
        """
        self.wait()
        self._apply_retention(block=False)
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
            return CheckpointMetadata(FORMAT_VERSION, step, model, mesh, zero_stage, optimizer, data, seed, leaves,
                                      finetune).to_json()

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
        """Block until the background save is committed; raises CheckpointWriteError if it failed.

        A committed step that retention would make room for is then read back and
        verified in the background; older steps are deleted only once it verifies."""
        step, self._writing = self._writing, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(step, error) from error
        if step is not None and jax.process_index() == 0 and self._expired(step):
            self._apply_retention(block=True)  # one read-back at a time
            self._verifying = (step, self._verifier.submit(verify_step, self.step_dir(step)))

    def finish(self) -> None:
        """wait(), then finish the read-back of the newest step and the retention it allows."""
        self.wait()
        self._apply_retention(block=True)

    def _expired(self, verified: int) -> list[int]:
        """The steps up to `verified` that `keep` newest and every `keep_every`-th leave out."""
        steps = [step for step in self.steps() if step <= verified]
        kept = set(steps[-self._keep:]) if self._keep else set(steps)
        kept |= {step for step in steps if self._keep_every and step % self._keep_every == 0}
        return [step for step in steps if step not in kept]

    def _apply_retention(self, block: bool) -> None:
        """Once the step being read back verifies, delete what it makes room for; if it does
        not verify, delete nothing and say so."""
        if self._verifying is None or (not block and not self._verifying[1].done()):
            return
        (step, check), self._verifying = self._verifying, None
        try:
            problems = check.result()
        except Exception as error:  # unreadable, or the read failed: not verified either way
            problems = error
        if problems:
            detail = describe_problems(problems) if isinstance(problems, list) else _named_first_line(problems)
            log.warning("step %d did not verify when read back: %s", step, detail)
            print(f"WARNING: step {step} did not verify when read back after writing ({detail}); no older step "
                  "is deleted", flush=True)
            return
        self._delete(self._expired(step))

    def _delete(self, steps: list[int]) -> None:
        """Rename the steps into `_deleted/` (each one atomic step out of the listing), then
        delete them there."""
        if not steps:
            return
        trash = self._trash() or os.path.join(self.directory, TRASH_DIR)
        os.makedirs(trash, exist_ok=True)
        for step in steps:
            target = os.path.join(trash, str(step))
            if os.path.lexists(target):
                shutil.rmtree(target)
            os.rename(self.step_dir(step), target)
        fsync_path(self.directory, directory=True)
        self._manager.reload()
        self._empty_trash()

    def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
        detail = first_line(error)
        return CheckpointWriteError(f"step {step} was not saved, writing it failed "
                                    f"(newest saved step: {max(self.steps(), default=None)}): {detail}")

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self._manager.close()
            self._verifier.shutdown()

    def restore_step(self, step: int, abstract_state: Any, *, model: dict, optimizer: dict | None = None,
                     finetune: dict | None = None) -> tuple[Any, CheckpointMetadata]:
        """Restore one step onto `abstract_state`'s shardings and verify every leaf.

        A params-only checkpoint (converted with --drop_optimizer, or imported from
        Hugging Face) restores with `opt_state=None`; the caller starts a fresh one.
        `optimizer` (the run's optimizer config) names a changed state layout; `finetune` (a
        LoRA run's adapters and base reference) must match the step's.
        """
        metadata = read_metadata(self.step_dir(step))
        check_model_matches(metadata.model, model)
        check_finetune_matches(step, metadata.finetune, finetune)
        if optimizer is not None and metadata.optimizer is not None:
            _check_optimizer_layout(step, self.step_dir(step), metadata.optimizer, optimizer)
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
        except Exception as error:
            raise self._classify_restore_error(step, error) from None
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

    def _classify_restore_error(self, step: int, error: Exception) -> RunError:
        """DamagedCheckpoint only when the bytes are proven bad; otherwise the error as it is."""
        machine = _machine_error(error)
        if machine is None:
            try:
                problems = verify_step(self.step_dir(step))
            except Exception as verify_error:  # the host read failed too: its reason decides
                machine = _machine_error(verify_error) or verify_error
            else:
                if problems:  # corrupt or missing files surface as many error types: name the leaves
                    return DamagedCheckpoint(f"step {step}: damaged leaves: {describe_problems(problems)}")
        cause = machine or error
        return CheckpointReadError(
            f"step {step} could not be restored ({_named_first_line(cause)}); its bytes were not proven damaged, "
            "so nothing was changed: fix the cause and rerun"
        )

    def restore_latest(self, abstract_state: Any, *, model: dict, optimizer: dict | None = None,
                       finetune: dict | None = None) -> tuple[Any, CheckpointMetadata] | None:
        """The newest step that verifies; None when there is no step at all.

        Damaged newer steps are reported and, once an older step has verified, set aside
        as `damaged-<step>`. If every step is damaged, NoVerifiedCheckpoint, and nothing
        is changed. Any error that is not proven damage stops the search and is raised.
        """
        damaged: list[tuple[int, DamagedCheckpoint]] = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore_step(step, abstract_state, model=model, optimizer=optimizer, finetune=finetune)
            except DamagedCheckpoint as error:
                damaged.append((step, error))
                log.warning("CHECKPOINT DAMAGED: %s", error)
                if jax.process_index() == 0:
                    print(f"WARNING: checkpoint damaged, trying the previous step: {error}", flush=True)
                continue
            self._set_aside([step for step, _ in damaged])
            return restored
        if damaged:
            listing = " | ".join(str(error) for _, error in damaged)
            raise NoVerifiedCheckpoint(
                f"no checkpoint in {self.directory} verifies ({listing}); nothing was changed. To start from "
                "scratch, move that directory away or set checkpoint.dir to a new one; "
                "`efficient-train checkpoint verify` names the damage"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged steps to `damaged-<step>[-k]`: kept, out of Orbax's listing."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = os.path.join(self.directory, f"{DAMAGED_PREFIX}{step}")
                suffix = 1
                while os.path.lexists(target):
                    suffix += 1
                    target = os.path.join(self.directory, f"{DAMAGED_PREFIX}{step}-{suffix}")
                os.rename(self.step_dir(step), target)
                fsync_path(self.directory, directory=True)
                print(f"WARNING: set the damaged step {step} aside as {target}; it is kept, and training "
                      "continues from the newest step that verifies", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("efficient_train_set_aside_damaged_steps")
        self._manager.reload()


def _check_optimizer_layout(step: int, step_dir: str, saved: dict, current: dict) -> None:
    changed = [name for name in STATE_LAYOUT_FIELDS if name in saved and saved[name] != current.get(name)]
    if not changed:
        return
    detail = ", ".join(f"optimizer.{name}: saved {saved[name]!r}, this run {current.get(name)!r}" for name in changed)
    raise CheckpointError(
        f"step {step} holds optimizer states of another layout ({detail}); set those fields back, or convert the "
        f"checkpoint: efficient-train checkpoint convert {step_dir} NEW_DIR --mesh data=N --state_format "
        f"{current.get('state_format')} (or --drop_optimizer to start a fresh optimizer)"
    )


def committed_steps(directory: str) -> list[int]:
    """The committed steps of a checkpoint directory, oldest first, read from the directory:
    a step's directory gets its final name (the step number) only when it is complete, so
    this never lists a save still in flight (Orbax's own list does). Empty when `directory`
    is not a directory; a directory that cannot be listed raises its OSError."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def damaged_steps(directory: str) -> list[str]:
    """The `damaged-<step>` directories that restore set aside in a checkpoint directory."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if name.startswith(DAMAGED_PREFIX))


def fsync_path(path: str, directory: bool = False) -> None:
    """Put a file's (or a directory's entries') bytes on stable storage."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
