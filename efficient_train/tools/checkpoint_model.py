"""A checkpoint's model, ready to run: what `efficient-train eval` and `generate` start from.

The model's fields come from the step's metadata (`report.model_config` checks them);
everything else (mesh, ZeRO stage, attention impl, data, batch) from the run's config,
so a checkpoint evaluates or samples on any mesh. Only the parameters are read, leaf
by leaf through `VerifiedReader` (each checked against its fingerprint as it is read:
a damaged step is refused, naming older steps to try), and placed directly in the
training plan's shardings; the optimizer state is never loaded. A LoRA checkpoint runs
as its base with the adapters merged in (`tools/lora.LoRASource`, which checks that the
base is the one the adapters were trained on), under the model fields the LoRA run recorded.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from efficient_train.checkpoint.metadata import CheckpointError, DamagedCheckpoint
from efficient_train.checkpoint.paths import resolve_step
from efficient_train.checkpoint.verify import LeafDamaged, VerifiedReader, read_step_metadata
from efficient_train.config import validate
from efficient_train.parallel.mesh import make_mesh
from efficient_train.tools.lora import LoRASource
from efficient_train.tools.report import damaged_step_message, model_config
from efficient_train.train.state import bind
from efficient_train.train.training_setup import TrainSetup, build_setup
from efficient_train.tree_paths import leaf_paths


@dataclasses.dataclass(frozen=True)
class CheckpointModel:
    config: ml_collections.ConfigDict  # the run's config with the checkpoint's model fields
    setup: TrainSetup
    params: Any  # pure dict of placed arrays
    step: int
    step_dir: str

    def module(self) -> Any:
        """The Llama module holding these parameters."""
        step_def = self.setup.step_def
        return bind(step_def.graphdef, step_def.param_structure, self.params, step_def.rest)


def load_checkpoint_model(checkpoint: str, config: ml_collections.ConfigDict) -> CheckpointModel:
    """The newest step of `checkpoint` (or the step it names) on `config`'s mesh."""
    step_dir, older = resolve_step(checkpoint, "--checkpoint")
    metadata = read_step_metadata(step_dir)
    if not metadata.model:
        raise CheckpointError(f"--checkpoint: {step_dir} was saved from a model of your own (no model config); "
                              "eval and generate run the built-in Llama")
    lora = LoRASource(step_dir, "--checkpoint") if metadata.finetune is not None else None
    model_config(metadata, step_dir)  # the fields' types, checked before they reach the config
    config = ml_collections.ConfigDict(config.to_dict())
    config.finetune.lora.rank, config.finetune.base = 0, ""  # the parameters read are the whole model
    for key, value in metadata.model.items():  # a LoRA run's own: its base's architecture, its compute dtype
        if key in config.model:
            config.model[key] = value
    mesh = make_mesh(validate(config, jax.device_count(), check_paths=False))
    setup = build_setup(config, mesh)
    abstract = setup.abstract_state.params
    names = [name for name, _ in leaf_paths({"params": abstract})]
    leaves = jax.tree.leaves(abstract)
    if lora is not None:  # verified as read; a damaged leaf raises DamagedCheckpoint naming it
        arrays = [_place(lora.read(name.removeprefix("params/")), leaf, name, step_dir)
                  for name, leaf in zip(names, leaves)]
    else:
        reader = VerifiedReader(step_dir, metadata)
        try:
            arrays = [_place(reader.read(name), leaf, name, step_dir) for name, leaf in zip(names, leaves)]
        except LeafDamaged:
            raise DamagedCheckpoint("--checkpoint: " + damaged_step_message(
                step_dir, metadata, reader.damaged(names), older, "its parameters cannot be used")) from None
    params = jax.tree.unflatten(jax.tree.structure(abstract), arrays)
    return CheckpointModel(config, setup, params, metadata.step, step_dir)


def _place(value: np.ndarray, abstract: jax.ShapeDtypeStruct, name: str, step_dir: str) -> jax.Array:
    if value.shape != abstract.shape or value.dtype != abstract.dtype:
        raise CheckpointError(f"{step_dir}: {name} is stored as {value.dtype}{list(value.shape)}, the model built "
                              f"from its metadata needs {abstract.dtype}{list(abstract.shape)}")
    return jax.make_array_from_callback(value.shape, abstract.sharding, lambda index: value[index])
