"""Checkpoints: atomic async saves, verified restores onto any mesh (see manager.py)."""
from efficient_train.checkpoint.manager import Checkpointer, DamagedCheckpoint, leaf_paths, read_metadata
from efficient_train.checkpoint.metadata import FORMAT_VERSION, CheckpointError, CheckpointMetadata

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "CheckpointMetadata", "Checkpointer", "DamagedCheckpoint",
    "leaf_paths", "read_metadata",
]
