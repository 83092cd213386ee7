"""What `efficient-train checkpoint inspect|verify` print: read from disk, no mesh, no model.

CKPT may name a step directory or a checkpoint directory (then its newest committed
step: a directory named by an integer, as Orbax leaves it after the atomic rename;
temporary directories of unfinished saves are never chosen).
"""
from __future__ import annotations

import os

import numpy as np

from efficient_train.checkpoint.manager import METADATA_ITEM, read_metadata
from efficient_train.checkpoint.metadata import CheckpointError
from efficient_train.checkpoint.verify import verify_step


def resolve_step_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise CheckpointError(f"CKPT: {path!r} is not a directory; give a checkpoint directory or one step in it")
    if os.path.isdir(os.path.join(path, METADATA_ITEM)) or os.path.basename(os.path.normpath(path)).isdigit():
        return path
    steps = sorted(int(name) for name in os.listdir(path) if name.isdigit() and os.path.isdir(os.path.join(path, name)))
    if not steps:
        raise CheckpointError(f"CKPT: {path!r} holds no committed step (directories named by a step number)")
    return os.path.join(path, str(steps[-1]))


def _disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def inspect_text(path: str) -> str:
    step_dir = resolve_step_dir(path)
    metadata = read_metadata(step_dir)
    mesh = " x ".join(f"{axis}={size}" for axis, size in metadata.mesh.items())
    origin = (f"saved from mesh {mesh} at ZeRO stage {metadata.zero_stage} (reference only: any mesh can load it)"
              if mesh else "written without a mesh (imported; any mesh can load it)")
    lines = [
        f"checkpoint {os.path.abspath(step_dir)}",
        f"step {metadata.step}, format version {metadata.format_version}, {origin}",
        (f"optimizer: {metadata.optimizer.get('state_format', 'fp32')} states" if metadata.optimizer is not None
         else "optimizer: none (params only; training from it starts a fresh optimizer state)")
        + (f"; data loader at batch {metadata.data['step']}" if metadata.data else "; user-supplied data"),
        "",
        f"{'leaf':<48} {'shape':<22} {'dtype':<10} {'bytes':>14}",
    ]
    total = 0
    for leaf, record in metadata.leaves.items():
        size = int(np.prod(record.shape, dtype=np.int64)) * np.dtype(record.dtype).itemsize
        total += size
        lines.append(f"{leaf:<48} {str(list(record.shape)):<22} {record.dtype:<10} {size:>14,}")
    lines.append(f"{len(metadata.leaves)} leaves, {total:,} bytes of arrays, {_disk_bytes(step_dir):,} bytes on disk")
    return "\n".join(lines)


def verify_text(path: str) -> tuple[bool, str]:
    step_dir = resolve_step_dir(path)
    metadata = read_metadata(step_dir)
    problems = verify_step(step_dir)
    if not problems:
        return True, f"OK: step {metadata.step}, all {len(metadata.leaves)} leaves match their fingerprints"
    lines = [f"DAMAGED: step {metadata.step}, {len(problems)} of {len(metadata.leaves)} leaves:"]
    lines += [f"  {problem.leaf}: {problem.problem}" for problem in problems]
    return False, "\n".join(lines)
