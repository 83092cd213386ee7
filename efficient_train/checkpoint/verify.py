"""Checking a saved step on the host: every leaf read back and its fingerprint recomputed.

Used by `efficient-train checkpoint verify`, by restore to name the leaves of a step
whose arrays could not be read, and by the tools that read a checkpoint (`convert`,
`export-hf`): they read through `VerifiedReader`, which checks each leaf against its
fingerprint as it reads it, so a tool never turns damaged bytes into a clean-looking
output and never reads the checkpoint twice to find out. Leaves are read one at a time
(storage.py), so host memory stays bounded by the largest leaf.

A step verifies only if metadata.json accounts for everything stored: the leaves in
Orbax's tree metadata (`state/_METADATA`) that metadata.json does not list have no
fingerprint to be checked against, so `verify` reports them instead of saying OK (a
metadata.json that lists no leaves, or only some, proves nothing about the rest).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import numpy as np

from efficient_train.checkpoint.fingerprint import host_fingerprint
from efficient_train.checkpoint.metadata import (
    ORBAX_TREE_FILE,
    STATE_ITEM,
    CheckpointError,
    CheckpointMetadata,
    CheckpointReadError,
    DamagedCheckpoint,
    LeafRecord,
    metadata_path,
    read_metadata_file,
)
from efficient_train.checkpoint.storage import UnreadableLeaf, read_leaf


@dataclasses.dataclass(frozen=True)
class LeafProblem:
    leaf: str
    problem: str


class LeafDamaged(DamagedCheckpoint):
    """Raised by VerifiedReader.read for a leaf that does not match its record."""

    def __init__(self, step_dir: str, problem: LeafProblem) -> None:
        super().__init__(f"{step_dir}: damaged leaf {problem.leaf}: {problem.problem}")
        self.problem = problem


def read_step_metadata(step_dir: str) -> CheckpointMetadata:
    """The checked metadata.json of a step (see metadata.read_metadata_file)."""
    return read_metadata_file(metadata_path(step_dir))


def check_leaf(step_dir: str, leaf: str, record: LeafRecord) -> tuple[np.ndarray | None, LeafProblem | None]:
    """(the array, None) when the stored leaf matches its record, else (None, what is wrong).

    Raises CheckpointReadError when the leaf cannot be read for a reason that is not damage.
    """
    try:
        array = read_leaf(step_dir, leaf)
    except UnreadableLeaf as error:
        return None, LeafProblem(leaf, error.problem)
    if tuple(array.shape) != tuple(record.shape) or str(array.dtype) != record.dtype:
        return None, LeafProblem(
            leaf, f"stored as {array.dtype}{list(array.shape)}, expected {record.dtype}{list(record.shape)}")
    try:
        fingerprint = host_fingerprint(array)
    except MemoryError:
        raise CheckpointReadError(f"{step_dir}: leaf {leaf}: out of host memory fingerprinting it") from None
    if fingerprint != record.fingerprint:
        return None, LeafProblem(leaf, "fingerprint mismatch")
    return array, None


def verify_step(step_dir: str) -> list[LeafProblem]:
    """Every damaged leaf the step's metadata lists (empty when they all verify); metadata
    problems raise. Leaves stored but not listed are `unlisted_leaves`' business."""
    metadata = read_step_metadata(step_dir)
    problems = []
    for leaf, record in metadata.leaves.items():
        problem = check_leaf(step_dir, leaf, record)[1]
        if problem is not None:
            problems.append(problem)
    return problems


def stored_leaves(step_dir: str) -> list[str]:
    """The leaves Orbax stored in the step, from its tree metadata (empty nodes left out)."""
    path = os.path.join(step_dir, STATE_ITEM, ORBAX_TREE_FILE)
    where = f"{STATE_ITEM}/{ORBAX_TREE_FILE}"
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        raise UnreadableLeaf(step_dir, where, "missing (Orbax writes it with every step)") from None
    except (ValueError, RecursionError) as error:
        raise UnreadableLeaf(step_dir, where, f"not valid JSON ({str(error)[:120]})") from None
    except OSError as error:
        raise CheckpointReadError(f"{path}: cannot be read ({error.strerror or error}); "
                                  "this says nothing about its bytes") from None
    tree = raw.get("tree_metadata") if isinstance(raw, dict) else None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: tree_metadata: missing or not an object; allowed: Orbax's tree metadata "
                              "as this efficient-train writes it")
    names = []
    for entry in tree.values():
        try:
            keys = [str(key["key"]) for key in entry["key_metadata"]]
            value_type = entry["value_metadata"].get("value_type")
            skipped = entry["value_metadata"].get("skip_deserialize", False)
        except (TypeError, KeyError, AttributeError):
            raise CheckpointError(f"{path}: tree_metadata: an entry without key_metadata or value_metadata; "
                                  "allowed: Orbax's tree metadata as this efficient-train writes it") from None
        if value_type != "None" and not skipped:
            names.append("/".join(keys))
    return names


def unlisted_leaves(step_dir: str, metadata: CheckpointMetadata) -> list[str]:
    """Leaves stored under state/ that metadata.json does not list (nothing to verify them by)."""
    return sorted(set(stored_leaves(step_dir)) - set(metadata.leaves))


class VerifiedReader:
    """Reads one step's leaves, each checked against metadata.json as it is read.

    `read` returns a leaf that matches its fingerprint, or raises LeafDamaged for the
    first one that does not. A tool that stops there can then name every damaged leaf
    it would have read with `damaged(names)`, which checks only the leaves not read yet.
    """

    def __init__(self, step_dir: str, metadata: CheckpointMetadata) -> None:
        self.step_dir, self.metadata = step_dir, metadata
        self._checked: dict[str, LeafProblem | None] = {}

    def read(self, leaf: str) -> np.ndarray:
        record = self.metadata.leaves.get(leaf)
        if record is None:
            raise CheckpointError(f"{self.step_dir}: leaf {leaf} is not listed in metadata.json, so it cannot be "
                                  "verified; allowed: a checkpoint whose metadata.json lists every leaf")
        array, problem = check_leaf(self.step_dir, leaf, record)
        self._checked[leaf] = problem
        if problem is not None:
            raise LeafDamaged(self.step_dir, problem)
        assert array is not None  # check_leaf gives an array exactly when there is no problem
        return array

    def damaged(self, leaves: Iterable[str]) -> list[LeafProblem]:
        """The damaged ones among `leaves` (those already read are not read again)."""
        problems = []
        for leaf in dict.fromkeys(leaves):
            if leaf not in self._checked and leaf in self.metadata.leaves:
                self._checked[leaf] = check_leaf(self.step_dir, leaf, self.metadata.leaves[leaf])[1]
            problem = self._checked.get(leaf)
            if problem is not None:
                problems.append(problem)
        return problems


def describe_problems(problems: list[LeafProblem]) -> str:
    if not problems:
        raise CheckpointError("describe_problems() needs at least one problem")
    return "; ".join(f"{p.leaf}: {p.problem}" for p in problems)
