"""Which step a path given to a tool names, and where a tool may write: shared by every tool.

CKPT may name a step directory or a checkpoint directory (then its newest committed
step: a directory named by an integer, as Orbax leaves it after the atomic rename;
temporary directories of unfinished saves are never chosen).

- `resolve_step`: the step a CKPT names, and the older steps beside it, so a tool
  refusing a damaged newest step can say which ones the user could pass instead.
- `check_destination`: a tool's output path must not be a regular file.
- `refuse_existing_steps`: a tool writes into a checkpoint directory only when it holds
  no committed step, because `train` resumes the newest step of its directory and
  retention deletes the oldest: a step written beside others is either never used or
  hides (and soon deletes) the user's own.
- `first_missing_dir`: what a tool that creates its output removes again when it fails.
"""
from __future__ import annotations

import os

from efficient_train.checkpoint.manager import committed_steps
from efficient_train.checkpoint.metadata import METADATA_ITEM, CheckpointError


def _is_step_dir(path: str) -> bool:
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

