"""Writing a checkpoint one leaf at a time, for tools that must not hold a whole model.

`convert` and `import-hf` produce state leaves one by one (a 70B model does not fit in
host memory at once). Orbax's partial saving writes each leaf into the step directory
as it comes and commits the whole step at the end, so peak memory is one leaf plus
Orbax's staging of it. The result is an ordinary step directory that `Checkpointer`
(and so `train`) restores: the arrays under `state/` in the same OCDBT + zarr layout,
`metadata/metadata.json` with a fingerprint per leaf.

Two details make the output identical in form to a trainer's save:
- Partial saves see one leaf at a time inside nested dicts, so Orbax records every key
  as a dict key and never sees the state's empty nodes (an absent exponent, optax's EmptyState); the
  tree metadata is rewritten afterwards from a structure of the state's structure, or
  Orbax would refuse to restore it into that structure.
- The step is assembled under `.writing-<step>/` and renamed into place only when the
  arrays and the metadata are both complete and on stable storage (every file and
  directory fsynced, then the checkpoint directory after the rename), so neither a
  crash nor a power cut leaves a listed step with missing bytes; leftovers of an
  earlier crash are removed at the next write, and a write that fails removes its own.

After each leaf the freed heap is handed back to the OS (glibc's malloc_trim), so peak
memory stays a few leaves, not a growing pile of fragments.

A leaf given as a sharded `jax.Array` is written shard by shard (one zarr chunk per
shard), which is the layout that loads fastest on that mesh.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax.traverse_util import unflatten_dict
from orbax.checkpoint import v1 as ocp
from orbax.checkpoint.experimental.v1 import partial

from efficient_train.checkpoint.fingerprint import device_fingerprint, host_fingerprint
from efficient_train.checkpoint.manager import fsync_path
from efficient_train.checkpoint.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    METADATA_ITEM,
    ORBAX_TREE_FILE,
    STATE_ITEM,
    CheckpointError,
    CheckpointMetadata,
    CheckpointWriteError,
    LeafRecord,
)
from efficient_train.checkpoint.paths import check_destination, first_missing_dir
from efficient_train.errors import InputError, RunError, first_line
from efficient_train.tree_paths import key_name

WRITING_PREFIX = ".writing-"
BATCH_BYTES = 128 << 20  # leaves written per partial save, at most (unless one leaf is larger)
SEQUENCE_KEY_TYPE, DICT_KEY_TYPE = 1, 2  # how Orbax's tree metadata tells keys apart

Leaf = np.ndarray | jax.Array


def _batches(leaves: Iterable[tuple[str, Leaf]]) -> Iterator[list[tuple[str, Leaf]]]:
    """Consecutive leaves grouped up to BATCH_BYTES (a larger leaf goes alone).

    Each partial save reads the metadata of the ones before it, so one save per leaf
    costs time quadratic in the number of leaves; batching small leaves keeps the number
    of saves small while a batch stays within about one large tensor of memory.
    """
    batch: list[tuple[str, Leaf]] = []
    size = 0
    for name, value in leaves:
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * np.dtype(value.dtype).itemsize
        if batch and size + nbytes > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append((name, value))
        size += nbytes
    if batch:
        yield batch


def _is_empty(node: Any) -> bool:
    """None, or a container without leaves (optax's EmptyState): Orbax records these as None."""
    return node is None or (isinstance(node, (tuple, list, dict)) and len(node) == 0)


def _rewrite_tree_metadata(state_dir: str, structure: Any) -> None:
    """Make Orbax's tree metadata describe `structure`: its key kinds and its empty nodes."""
    path = os.path.join(state_dir, ORBAX_TREE_FILE)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    written = raw["tree_metadata"]
    entries = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(structure, is_leaf=_is_empty)[0]:
        names = tuple(key_name(key) for key in keys)
        key_metadata = [
            {"key": name, "key_type": SEQUENCE_KEY_TYPE if isinstance(key, jax.tree_util.SequenceKey) else DICT_KEY_TYPE}
            for name, key in zip(names, keys)
        ]
        if _is_empty(leaf):
            value_metadata = {"value_type": "None", "skip_deserialize": True}
        else:
            value_metadata = written[repr(names)]["value_metadata"]
        entries[repr(names)] = {"key_metadata": key_metadata, "value_metadata": value_metadata}
    raw["tree_metadata"] = entries
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f)


def _return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, and peak memory grows by
    several leaves' worth of fragments: measured 1.6x the state instead of a few leaves)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _fingerprint(value: Leaf) -> str:
    return device_fingerprint(value) if isinstance(value, jax.Array) else host_fingerprint(np.asarray(value))


def clean_unfinished(directory: str) -> None:
    """Remove what an interrupted write left behind (never a committed step)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(WRITING_PREFIX):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _fsync_tree(root: str) -> None:
    """Every file and directory under `root` on stable storage, children before parents."""
    for path, _, names in os.walk(root, topdown=False):
        for name in names:
            fsync_path(os.path.join(path, name))
        fsync_path(path, directory=True)


def _write_failed(step: int, directory: str, error: BaseException) -> CheckpointWriteError:
    detail = first_line(error, 300)
    return CheckpointWriteError(f"writing step {step} into {directory} failed, nothing was committed: {detail}")


def write_checkpoint(
    directory: str,
    step: int,
    leaves: Iterable[tuple[str, Leaf]],
    *,
    model: dict,
    optimizer: dict | None,
    mesh: dict | None = None,
    zero_stage: int = 0,
    seed: int = 0,
    data: dict | None = None,
    structure: Any = None,
    flag: str = "DST",
) -> str:
    """Write step `step` into checkpoint directory `directory` from (name, array) pairs.

    Names are the state's leaf names ("params/blocks/attn/q/kernel"); "step" and
    "skipped_steps" are added when absent. `optimizer=None` marks a params-only
    checkpoint (training from it starts a fresh optimizer state). `structure`, a pytree
    with the state's structure (e.g. its abstract state), makes the tree metadata
    match that structure (see the module docstring); without it every key is a dict key.
    Returns the committed step directory.

    Whatever stops the write (the leaves' iterator raising, e.g. a damaged source leaf,
    a failed write, an interrupt) leaves nothing behind: the staging directory is
    removed, and so is `directory` when this call created it. A failed write of ours is
    a CheckpointWriteError; what the iterator raised is raised unchanged. Committing
    fsyncs every file and directory of the step before the rename and the checkpoint
    directory after it, so a power cut cannot leave a listed step with missing bytes.
    `flag` names the destination in errors (DST, OUT).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step: {step!r} is not allowed; allowed: a non-negative integer")
    check_destination(directory, flag)
    directory = os.path.abspath(directory)
    final = os.path.join(directory, str(step))
    if os.path.exists(final):
        raise CheckpointError(f"{flag}: {final} already exists; choose an empty checkpoint directory")
    created = first_missing_dir(directory)  # the outermost directory this call creates, if any
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise _write_failed(step, directory, error) from None
    clean_unfinished(directory)
    wrapper = os.path.join(directory, f"{WRITING_PREFIX}{step}")
    staging = os.path.join(wrapper, str(step))
    try:
        _write_staging(staging, step, leaves, model=model, optimizer=optimizer, mesh=mesh, zero_stage=zero_stage,
                       seed=seed, data=data, structure=structure)
        try:
            _fsync_tree(staging)
            os.rename(staging, final)
        except OSError as error:
            raise _write_failed(step, directory, error) from None
    except BaseException:
        shutil.rmtree(wrapper, ignore_errors=True)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    shutil.rmtree(wrapper, ignore_errors=True)
    try:
        fsync_path(directory, directory=True)  # the rename itself
        made = directory
        while created and made != os.path.dirname(created):  # and the entries of directories we made
            made = os.path.dirname(made)
            fsync_path(made, directory=True)
    except OSError as error:
        raise CheckpointWriteError(f"step {step} was renamed into {directory} but syncing the directory "
                                   f"failed ({error.strerror or error}); run `checkpoint verify` on it") from None
    return final


def _write_staging(staging: str, step: int, leaves: Iterable[tuple[str, Leaf]], *, model: dict,
                   optimizer: dict | None, mesh: dict | None, zero_stage: int, seed: int, data: dict | None,
                   structure: Any) -> None:
    """The whole step under `staging`: the arrays (Orbax partial saves), then metadata.json."""
    context = ocp.Context()
    context.array.saving.use_zarr3 = False  # the zarr v2 layout the trainer's saves use
    context.array.saving.use_compression = False

    def orbax(call, *args) -> None:
        try:
            call(*args)
        except (InputError, RunError):
            raise
        except Exception as error:  # Orbax and tensorstore report a failed write in many types
            raise _write_failed(step, os.path.dirname(os.path.dirname(staging)), error) from None

    records: dict[str, LeafRecord] = {}
    with context:
        for batch in _batches(leaves):  # what the leaves' iterator raises passes through
            for name, value in batch:
                records[name] = LeafRecord(tuple(value.shape), str(value.dtype), _fingerprint(value))
            orbax(partial.save, staging, unflatten_dict(dict(batch), sep="/"))
            del batch
            _return_freed_memory()
        for name in ("step", "skipped_steps"):
            if name not in records:
                value = np.asarray(step if name == "step" else 0, np.int32)
                records[name] = LeafRecord((), "int32", _fingerprint(value))
                orbax(partial.save, staging, unflatten_dict({name: value}, sep="/"))
        orbax(partial.finalize, staging)
    if structure is not None:
        orbax(_rewrite_tree_metadata, os.path.join(staging, STATE_ITEM), structure)

    metadata = CheckpointMetadata(FORMAT_VERSION, step, model, mesh or {}, zero_stage, optimizer, data, seed, records)

    def write_metadata() -> None:
        os.makedirs(os.path.join(staging, METADATA_ITEM))
        with open(os.path.join(staging, METADATA_ITEM, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata.to_json(), f)

    orbax(write_metadata)
