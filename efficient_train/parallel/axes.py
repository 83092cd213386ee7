"""The mesh's axis names, the ZeRO stages and the sequence-parallel modes: plain names, no imports.

They are this package's to own (mesh.py builds the mesh from MESH_AXES, sharding.py
implements the stages, sequence.py dispatches the modes) and live in a module without
jax so that `config.validate` and the checkpoint metadata can check values against
them before jax starts.
"""
from __future__ import annotations

MESH_AXES = ("replica", "data", "expert", "sequence", "tensor")
ZERO_STAGES = (0, 1, 2, 3)
SEQUENCE_PARALLEL_MODES = ("ulysses", "ring", "all_gather")
