"""Checking a saved step on the host: every leaf read back and its fingerprint recomputed.

Used by `efficient-train checkpoint verify`, and by restore to name the leaves of a
step whose arrays could not be read. Leaves are read one at a time (storage.py), so
host memory stays bounded by the largest leaf.
"""
from __future__ import annotations

import dataclasses

from efficient_train.checkpoint.fingerprint import host_fingerprint
from efficient_train.checkpoint.metadata import CheckpointError
from efficient_train.checkpoint.storage import read_leaf


@dataclasses.dataclass(frozen=True)
class LeafProblem:
    leaf: str
    problem: str


def verify_step(step_dir: str) -> list[LeafProblem]:
    """Every damaged leaf of the step (empty when it verifies); metadata problems raise."""
    from efficient_train.checkpoint.manager import read_metadata

    metadata = read_metadata(step_dir)
    problems = []
    for leaf, record in metadata.leaves.items():
        try:
            array = read_leaf(step_dir, leaf)
        except Exception as error:  # tensorstore reports missing and corrupt chunks alike
            problems.append(LeafProblem(leaf, f"unreadable ({str(error).splitlines()[0][:160]})"))
            continue
        if tuple(array.shape) != tuple(record.shape) or str(array.dtype) != record.dtype:
            problems.append(LeafProblem(leaf, f"stored as {array.dtype}{list(array.shape)}, expected {record.dtype}{list(record.shape)}"))
        elif host_fingerprint(array) != record.fingerprint:
            problems.append(LeafProblem(leaf, "fingerprint mismatch"))
    return problems


def describe(problems: list[LeafProblem]) -> str:
    if not problems:
        raise CheckpointError("describe() needs at least one problem")
    return "; ".join(f"{p.leaf}: {p.problem}" for p in problems)
