"""Checkpoints: atomic async saves, verified restores onto any mesh (see manager.py).

The names are imported on first use (efficient_train/lazy.py): `metadata` is plain
Python, and the command line reads its `CheckpointError` before it knows whether the
command needs jax and Orbax at all (`--help`, a bad flag).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_train.lazy import lazy_attributes

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "CheckpointMetadata", "CheckpointWriteError", "Checkpointer", "DamagedCheckpoint",
    "leaf_paths", "read_metadata",
]
__getattr__, __dir__ = lazy_attributes(__name__, {
    **dict.fromkeys(["Checkpointer", "read_metadata"], "efficient_train.checkpoint.manager"),
    "leaf_paths": "efficient_train.tree_paths",
    **dict.fromkeys(["FORMAT_VERSION", "CheckpointError", "CheckpointMetadata", "CheckpointWriteError",
                     "DamagedCheckpoint"],
                    "efficient_train.checkpoint.metadata"),
})

if TYPE_CHECKING:
    from efficient_train.checkpoint.manager import Checkpointer, read_metadata
    from efficient_train.checkpoint.metadata import (
        FORMAT_VERSION,
        CheckpointError,
        CheckpointMetadata,
        CheckpointWriteError,
        DamagedCheckpoint,
    )
    from efficient_train.tree_paths import leaf_paths
