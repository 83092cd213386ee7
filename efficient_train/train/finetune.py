"""A LoRA run's base: its frozen parameters, read from a checkpoint, and the reference that pins it.

`finetune.base` names a checkpoint directory (its newest step) or one step. The base's
parameters are read leaf by leaf through `VerifiedReader` (each checked against its
fingerprint as it is read) and placed straight into the frozen plan's shardings; its
optimizer state, if any, is never read. The run's own checkpoints then hold only the
adapters and their optimizer state, plus `finetune` in metadata.json: the adapters'
settings and the base's reference `{path, step, fingerprint}`, where the fingerprint
is a hash of the base's parameter leaf names, shapes, dtypes and fingerprints (what
metadata.json already holds, so pinning costs no read of the weights). A resume whose
`finetune.base` hashes differently is refused (`check_finetune_matches`): adapters
trained on one base mean nothing on another.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from efficient_train.checkpoint.metadata import (
    CheckpointError,
    CheckpointMetadata,
    DamagedCheckpoint,
    check_model_matches,
)
from efficient_train.checkpoint.paths import resolve_step
from efficient_train.checkpoint.verify import LeafDamaged, VerifiedReader, read_step_metadata
from efficient_train.models.lora import LoRAConfig
from efficient_train.train.training_setup import TrainSetup
from efficient_train.tree_paths import leaf_paths

PARAMS_PREFIX = "params/"


def base_fingerprint(metadata: CheckpointMetadata) -> str:
    """16 hex digits identifying a checkpoint's parameters: a hash of each params leaf's
    name, shape, dtype and fingerprint (equal for the same weights on any mesh)."""
    records = sorted((name, list(r.shape), r.dtype, r.fingerprint) for name, r in metadata.leaves.items()
                     if name.startswith(PARAMS_PREFIX))
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]


def base_reference(step_dir: str, metadata: CheckpointMetadata) -> dict[str, Any]:
    """What a LoRA checkpoint records of its base: where it was, which step, its fingerprint."""
    return {"path": os.path.abspath(step_dir), "step": metadata.step, "fingerprint": base_fingerprint(metadata)}


def finetune_record(lora: LoRAConfig, reference: dict[str, Any]) -> dict[str, Any]:
    """metadata.json's `finetune` of a LoRA run."""
    return {"lora": lora.record(), "base": reference}


@dataclasses.dataclass(frozen=True)
class FinetuneBase:
    params: Any  # pure dict of placed arrays, the frozen plan's shardings
    step_dir: str
    reference: dict[str, Any]


def base_step(base: str, flag: str = "finetune.base") -> tuple[str, list[str], CheckpointMetadata]:
    """(the base's step directory, older steps beside it, its metadata); a LoRA checkpoint is refused."""
    step_dir, older = resolve_step(base, flag)
    metadata = read_step_metadata(step_dir)
    if metadata.finetune is not None:
        raise CheckpointError(f"{flag}: {step_dir} is itself a LoRA checkpoint; merge it into a full checkpoint "
                              "first (efficient-train checkpoint merge-lora SRC DST) and use that as the base")
    return step_dir, older, metadata


def load_base(setup: TrainSetup, model_record: dict) -> FinetuneBase:
    """The frozen parameters of `finetune.base`, verified and placed, and their reference."""
    step_dir, older, metadata = base_step(setup.config.finetune.base)
    try:
        check_model_matches(metadata.model, model_record)
    except CheckpointError as error:
        raise CheckpointError(f"finetune.base: {step_dir}: {error}") from None
    abstract = setup.abstract_state.frozen
    names = [PARAMS_PREFIX + name for name, _ in leaf_paths(abstract)]
    reader = VerifiedReader(step_dir, metadata)
    try:
        arrays = [_place(reader.read(name), leaf, name, step_dir) for name, leaf in zip(names, jax.tree.leaves(abstract))]
    except LeafDamaged:
        damaged = ", ".join(problem.leaf for problem in reader.damaged(names))
        newer_hint = f"; older steps: {', '.join(older[:3])}" if older else ""
        raise DamagedCheckpoint(f"finetune.base: {step_dir} is damaged ({damaged}){newer_hint}") from None
    params = jax.tree.unflatten(jax.tree.structure(abstract), arrays)
    return FinetuneBase(params, step_dir, base_reference(step_dir, metadata))


def _place(value: np.ndarray, abstract: jax.ShapeDtypeStruct, name: str, step_dir: str) -> jax.Array:
    if value.shape != abstract.shape or value.dtype != abstract.dtype:
        raise CheckpointError(f"finetune.base: {step_dir}: {name} is stored as {value.dtype}{list(value.shape)}, this "
                              f"run's model needs {abstract.dtype}{list(abstract.shape)} (model.param_dtype, "
                              "model.scan_layers)")
    return jax.make_array_from_callback(value.shape, abstract.sharding, lambda index: value[index])
