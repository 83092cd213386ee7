"""What `efficient-train checkpoint inspect|verify` print, and the checks of a step the tools share.

Nothing here needs a mesh or a model: leaves are read from disk one at a time.

- `model_config`: the checked `ModelConfig` of a step's metadata (the model fields'
  types are checked here, where the dataclass is known; metadata.py checks the rest).
- `damaged_step_message`: one line refusing a damaged step, naming older steps to try.
"""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from efficient_train.checkpoint.manager import damaged_steps
from efficient_train.checkpoint.metadata import CheckpointError, CheckpointMetadata, metadata_path
from efficient_train.checkpoint.paths import resolve_step_dir
from efficient_train.checkpoint.verify import (
    LeafProblem,
    UnreadableLeaf,
    read_step_metadata,
    unlisted_leaves,
    verify_step,
)

TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


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

    source = metadata_path(step_dir)
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


def _disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def _finetune_lines(metadata: CheckpointMetadata) -> list[str]:
    """A LoRA checkpoint's adapters and the base it needs (train/finetune.py)."""
    if metadata.finetune is None:
        return []
    lora, base = metadata.finetune["lora"], metadata.finetune["base"]
    return [f"LoRA adapters: rank {lora['rank']}, alpha {lora['alpha']}, targets {','.join(lora['targets'])}; on base "
            f"{base['path']} (step {base['step']}, fingerprint {base['fingerprint']}); `checkpoint merge-lora` "
            "writes the merged model"]


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
        *_finetune_lines(metadata),
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

