"""What `efficient-train checkpoint inspect|verify` print, and what every tool shares.

CKPT may name a step directory or a checkpoint directory (then its newest committed
step: a directory named by an integer, as Orbax leaves it after the atomic rename;
temporary directories of unfinished saves are never chosen). Nothing here needs a mesh
or a model: leaves are read from disk one at a time.

Shared by the tools that read or write checkpoints (convert, import-hf, export-hf):
- `resolve_step`: the step a CKPT names, and the older steps beside it, so a tool
  refusing a damaged newest step can say which ones the user could pass instead.
- `model_config`: the checked `ModelConfig` of a step's metadata (the model fields'
  types are checked here, where the dataclass is known; metadata.py checks the rest).
- `check_destination`: a tool's output path must not be a regular file.
- `refuse_existing_steps`: a tool writes into a checkpoint directory only when it holds
  no committed step, because `train` resumes the newest step of its directory and
  retention deletes the oldest: a step written beside others is either never used or
  hides (and soon deletes) the user's own.
"""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from efficient_train.checkpoint.manager import committed_steps, damaged_steps
from efficient_train.checkpoint.metadata import CheckpointError, CheckpointMetadata
from efficient_train.checkpoint.verify import (
    LeafProblem,
    UnreadableLeaf,
    read_step_metadata,
    unlisted_leaves,
    verify_step,
)

TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


def _is_step_dir(path: str) -> bool:
    from efficient_train.checkpoint.manager import METADATA_ITEM

    return os.path.isdir(os.path.join(path, METADATA_ITEM)) or os.path.basename(os.path.normpath(path)).isdigit()


def resolve_step(path: str, flag: str = "CKPT") -> tuple[str, list[str]]:
    """(the step directory `path` names, the older committed step directories beside it,
    newest first; empty when `path` names a step itself)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag}: {path!r} is not a directory; give a checkpoint directory or one step in it")
    if _is_step_dir(path):
        return path, []
    steps = committed_steps(path)
    if not steps:
        raise CheckpointError(f"{flag}: {path!r} holds no committed step (directories named by a step number)")
    return os.path.join(path, str(steps[-1])), [os.path.join(path, str(step)) for step in reversed(steps[:-1])]


def resolve_step_dir(path: str, flag: str = "CKPT") -> str:
    return resolve_step(path, flag)[0]


def damaged_step_message(step_dir: str, metadata: CheckpointMetadata, problems: list[LeafProblem],
                         older: list[str], what: str) -> str:
    """One line refusing a damaged step: its damaged leaves, and the older steps to try."""
    text = (f"step {metadata.step} ({step_dir}) is damaged, {what}: "
            + "; ".join(f"{p.leaf}: {p.problem}" for p in problems))
    if older:
        return text + f"; older steps you can pass instead: {', '.join(older)} (check one with `checkpoint verify`)"
    return text


def model_config(metadata: CheckpointMetadata, step_dir: str):
    """The step's `ModelConfig`, each field checked against the dataclass's type first."""
    from efficient_train.models import ModelConfig

    source = os.path.join(step_dir, "metadata", "metadata.json")
    for field in dataclasses.fields(ModelConfig):
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if field.name not in metadata.model or kind not in TYPE_NAMES:
            continue
        value = metadata.model[field.name]
        ok = (isinstance(value, bool) if kind == "bool" else
              isinstance(value, int) and not isinstance(value, bool) if kind == "int" else
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{source}: model.{field.name}: is {value!r}; allowed: {TYPE_NAMES[kind]}")
    try:
        return ModelConfig.from_config_dict(metadata.model)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: model: {str(error).splitlines()[0]}") from None


def check_destination(path: str, flag: str) -> None:
    """A tool's output is a directory: refuse a path that is a file (or under one)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{flag}: {path!r} is a file; allowed: a new or existing directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{flag}: {parent!r} is a file, so {path!r} cannot be created; allowed: a directory path")


def existing_steps_problem(directory: str, flag: str) -> str | None:
    """Why a tool must not write into `directory` (it holds committed steps), or None."""
    steps = committed_steps(directory)
    if not steps:
        return None
    return (f"{flag}: {os.path.abspath(directory)} already exists and holds step(s) {', '.join(map(str, steps))}; "
            "train resumes the newest step of a directory and retention deletes the oldest, so a tool writes only "
            "into a checkpoint directory without steps: choose a new or empty one")


def first_missing_dir(directory: str) -> str | None:
    """The outermost missing directory on the way to `directory` (None: it exists), which is
    what a tool that creates `directory` removes again when it fails."""
    directory = os.path.abspath(directory)
    missing = None
    while not os.path.exists(directory):
        missing, directory = directory, os.path.dirname(directory)
    return missing


def refuse_existing_steps(directory: str, flag: str) -> None:
    problem = existing_steps_problem(directory, flag)
    if problem:
        raise CheckpointError(problem)


def _disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def inspect_text(path: str) -> str:
    step_dir = resolve_step_dir(path)
    metadata = read_step_metadata(step_dir)
    mesh = " x ".join(f"{axis}={size}" for axis, size in metadata.mesh.items())
    origin = (f"saved from mesh {mesh} at ZeRO stage {metadata.zero_stage} (reference only: any mesh can load it)"
              if mesh else "written without a mesh (imported; any mesh can load it)")
    loader = metadata.data.get("step") if metadata.data else None
    lines = [
        f"checkpoint {os.path.abspath(step_dir)}",
        f"step {metadata.step}, format version {metadata.format_version}, {origin}",
        (f"optimizer: {metadata.optimizer.get('state_format', 'fp32')} states" if metadata.optimizer is not None
         else "optimizer: none (params only; training from it starts a fresh optimizer state)")
        + (f"; data loader at batch {loader}" if loader is not None else
           "; data loader state recorded" if metadata.data else "; user-supplied data"),
        "",
        f"{'leaf':<48} {'shape':<22} {'dtype':<10} {'bytes':>14}",
    ]
    total = 0
    for leaf, record in metadata.leaves.items():
        size = jnp.dtype(record.dtype).itemsize
        for n in record.shape:
            size *= n
        total += size
        lines.append(f"{leaf:<48} {str(list(record.shape)):<22} {record.dtype:<10} {size:>14,}")
    lines.append(f"{len(metadata.leaves)} leaves, {total:,} bytes of arrays, {_disk_bytes(step_dir):,} bytes on disk")
    checkpoint_dir = os.path.dirname(os.path.abspath(step_dir))
    set_aside = damaged_steps(checkpoint_dir)
    if set_aside:
        lines.append(f"damaged steps set aside in {checkpoint_dir} (kept, never restored; `checkpoint verify` on "
                     f"one names its damage): {', '.join(set_aside)}")
    return "\n".join(lines)


def verify_text(path: str) -> tuple[bool, str]:
    """(True, "OK: ...") only when every stored leaf is listed and matches its fingerprint."""
    step_dir = resolve_step_dir(path)
    metadata = read_step_metadata(step_dir)
    problems = verify_step(step_dir)
    try:
        unlisted = unlisted_leaves(step_dir, metadata)
    except UnreadableLeaf as error:
        problems.append(LeafProblem(error.leaf, error.problem))
        unlisted = []
    if not problems and not unlisted and metadata.leaves:
        return True, f"OK: step {metadata.step}, all {len(metadata.leaves)} leaves match their fingerprints"
    lines = []
    if problems:
        lines.append(f"DAMAGED: step {metadata.step}, {len(problems)} of {len(metadata.leaves)} leaves:")
        lines += [f"  {problem.leaf}: {problem.problem}" for problem in problems]
    if unlisted:
        lines.append(f"NOT VERIFIED: step {metadata.step}: metadata.json lists {len(metadata.leaves)} leaves, "
                     f"state/ holds {len(unlisted)} more that it does not list (no fingerprint to check them by):")
        lines += [f"  {leaf}: stored but not listed in metadata.json" for leaf in unlisted]
    elif not metadata.leaves:
        lines.append(f"NOT VERIFIED: step {metadata.step}: metadata.json lists no leaves, so nothing was checked")
    return False, "\n".join(lines)
