"""Hugging Face interop: loading weights, and streaming checkpoint conversion.

Families: Llama 3.x, Qwen 2/2.5, Qwen 3 (dense), Mistral and Gemma 2/3 text models.
- `config_from_hf` / `config_to_hf` (tools/hf_config.py) translate config.json <->
  `ModelConfig`, refusing what the model cannot compute with one line naming the field.
- `load_llama(hf_dir)` returns our `Llama` holding the HF weights, ready to call on
  token ids (positions and segment ids default to one unpadded document per row).
- `import_hf` writes a params-only checkpoint (step 0, no optimizer state) that the
  trainer fine-tunes from when its config has the same model fields; `export_hf` writes
  a checkpoint's parameters as safetensors shards plus config.json.
- The tokenizer travels: import copies the model directory's tokenizer and generation
  files (`HF_SIDE_FILES`) into `<checkpoint dir>/tokenizer/` (a directory `data.tokenizer`
  accepts), where training leaves them, and export copies them into the exported
  directory, which is then a complete model `from_pretrained` and a tokenizer load. Both stream: one
  parameter (for scanned layers, one [layers, ...] stack) is in host memory at a time,
  never the model, so a model larger than host memory converts.

The name and shape mapping and the safetensors files live in `tools/safetensors.py`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from typing import cast

import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_train.checkpoint.metadata import COMPUTE_FIELDS, CheckpointWriteError, DamagedCheckpoint
from efficient_train.checkpoint.paths import check_destination, first_missing_dir, refuse_existing_steps, resolve_step
from efficient_train.checkpoint.verify import LeafDamaged, VerifiedReader, read_step_metadata
from efficient_train.checkpoint.writer import write_checkpoint
from efficient_train.models import Llama, ModelConfig
from efficient_train.models.llama.config import AttentionImpl, DTypeName
from efficient_train.tools.hf_config import CONFIG_FILE, config_from_hf, config_to_hf
from efficient_train.tools.report import damaged_step_message, model_config
from efficient_train.tools.safetensors import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    HFError,
    SafetensorsDir,
    TensorSpec,
    conversion_dtype,
    shard_files,
    tensor_maps,
    write_safetensors,
)

__all__ = [
    "HFError", "config_from_hf", "config_to_hf", "export_hf", "import_hf", "load_llama", "read_hf_config",
    "train_overrides",
]

TOKENIZER_DIR = "tokenizer"  # inside a checkpoint directory, beside the steps
# What a HF model directory holds besides weights and config.json: tokenizer and generation settings.
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
# The ModelConfig fields `train_overrides` always prints (the rest only where they differ from the default).
STORED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "rope_theta", "rms_norm_eps", "tie_embeddings", "param_dtype", "scan_layers")


class ExportWriteError(CheckpointWriteError):
    """Writing the exported Hugging Face directory failed (disk full, I/O error)."""


def read_hf_config(hf_dir: str) -> ModelConfig:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFError(f"{CONFIG_FILE}: not found in {hf_dir!r}; give a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except OSError as error:
        raise HFError(f"{CONFIG_FILE}: cannot be read ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:  # not JSON, or not UTF-8
        raise HFError(f"{CONFIG_FILE}: not valid JSON ({str(error)[:120]})") from None
    return config_from_hf(hf)


def load_llama(hf_dir: str, *, dtype: str = "float32", attention_impl: str = "xla") -> Llama:
    """Our `Llama` with the weights of a HF directory, parameters and compute in `dtype`.

    `model(ids)` on int token ids [batch, seq] gives fp32 logits [batch, seq, vocab].
    """
    np_dtype = conversion_dtype(dtype, "dtype")
    cfg = dataclasses.replace(read_hf_config(hf_dir), dtype=cast(DTypeName, dtype), param_dtype=cast(DTypeName, dtype),
                              attention_impl=cast(AttentionImpl, attention_impl))
    files = SafetensorsDir(hf_dir)
    maps = {m.leaf: m for m in tensor_maps(cfg)}
    files.check(list(maps.values()))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = cast(tuple[nnx.GraphDef, nnx.State, nnx.State], nnx.split(abstract, nnx.Param, ...))
    loaded = [
        (path, variable.replace(jnp.asarray(files.read_leaf(maps["/".join(map(str, path))], np_dtype))))
        for path, variable in nnx.to_flat_state(params)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(loaded), rest)


def import_hf(hf_dir: str, out: str, *, param_dtype: str = "float32", scan_layers: bool = True) -> str:
    """Write HF weights as step 0 of checkpoint directory `out` (parameters only).

    The recorded model config is `config_from_hf` with `param_dtype` and `scan_layers`;
    training from it needs a config with the same model fields (the command prints them).
    Returns the step directory.

    `out` must hold no committed step at all, not only no step 0: `train` resumes the
    newest step of its checkpoint directory, so an import beside a step 5 would never
    be trained from, and retention would delete it as the oldest. Refused with the steps
    named, before any weight is read.
    """
    np_dtype = conversion_dtype(param_dtype, "param_dtype")
    check_destination(out, "OUT")
    refuse_existing_steps(out, "OUT")
    cfg = dataclasses.replace(read_hf_config(hf_dir), param_dtype=cast(DTypeName, param_dtype), scan_layers=scan_layers)
    files = SafetensorsDir(hf_dir)
    maps = tensor_maps(cfg)
    files.check(maps)
    leaves = (("params/" + m.leaf, files.read_leaf(m, np_dtype)) for m in maps)
    step_dir = write_checkpoint(out, 0, leaves, model=cfg.record(), optimizer=None, flag="OUT")
    side = [name for name in HF_SIDE_FILES if os.path.isfile(os.path.join(hf_dir, name))]
    if side:
        os.makedirs(os.path.join(out, TOKENIZER_DIR), exist_ok=True)
        for name in side:
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out, TOKENIZER_DIR, name))
    return step_dir


def side_files(step_dir: str) -> tuple[str, list[str]]:
    """The directory holding a checkpoint's tokenizer and generation files, and their names."""
    directory = os.path.join(os.path.dirname(os.path.abspath(step_dir)), TOKENIZER_DIR)
    names = [name for name in HF_SIDE_FILES if os.path.isfile(os.path.join(directory, name))]
    return directory, names


def train_overrides(step_dir: str) -> list[str]:
    """The `--config.model.*` flags under which the trainer accepts imported `step_dir`."""
    model = read_step_metadata(step_dir).model
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return [f"--config.model.{field}={value}" for field, value in model.items()
            if field in STORED_FIELDS or (field in defaults and value != defaults[field]
                                          and field not in COMPUTE_FIELDS)]


def _remove_output(out_dir: str, created: str | None, names: list[str]) -> None:
    """Undo a failed export: the directories this call created, else the files it wrote."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for name in names:
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass


def export_hf(ckpt: str, out_dir: str, *, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, adapters_only: bool = False) -> list[str]:
    """Write the parameters of checkpoint `ckpt` (a step, or its newest) as a HF directory.

    `dtype` (default: the checkpoint's param_dtype) is the dtype of the written tensors.
    Returns the safetensors file names written into `out_dir`. A LoRA checkpoint exports
    its base with the adapters merged in (tools/lora.py), or with `adapters_only` the
    adapters alone in the PEFT layout.

    Every parameter is checked against its fingerprint as it is read. A damaged one
    stops the export, which then removes what it wrote (OUT_DIR itself when it created
    it) and raises DamagedCheckpoint naming every damaged parameter and the older steps
    the user could export instead.
    """
    from efficient_train.tools.lora import LoRASource, write_peft

    step_dir, older = resolve_step(ckpt)
    metadata = read_step_metadata(step_dir)
    if adapters_only:
        if metadata.finetune is None:
            raise HFError(f"--adapters_only: {step_dir} is not a LoRA checkpoint (no finetune in its metadata.json); "
                          "export the whole model without it")
        return write_peft(step_dir, out_dir, dtype)
    lora = LoRASource(step_dir, "CKPT") if metadata.finetune is not None else None
    if lora is not None:  # the base's parameters, merged with the adapters as they are read
        step_dir, metadata = lora.base_dir, lora.base_metadata
    if not metadata.model:
        raise HFError(f"{step_dir}: holds a user's own module, not the built-in Llama; nothing to export")
    cfg = model_config(metadata, step_dir)
    dtype = dtype or cfg.param_dtype
    out_dtype = conversion_dtype(dtype, "dtype")
    maps = tensor_maps(cfg)
    for m in maps:
        record = metadata.leaves.get("params/" + m.leaf)
        if record is None or tuple(record.shape) != m.leaf_shape:
            raise HFError(f"{step_dir}: leaf params/{m.leaf} is missing or not shaped {list(m.leaf_shape)}")
    hf_config = config_to_hf(cfg, dtype)  # refuses a model no HF architecture computes, before writing
    check_destination(out_dir, "OUT_DIR")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise HFError(f"OUT_DIR: {out_dir!r} is not empty; choose a new directory")
    created = first_missing_dir(out_dir)
    reader = VerifiedReader(step_dir, metadata)
    side_dir, side = side_files(step_dir)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for m in maps:
            value = reader.read("params/" + m.leaf) if lora is None else lora.read(m.leaf)
            for name, part in zip(m.hf_names, m.parts(value)):
                yield name, m.to_hf(part).astype(out_dtype)

    plan = [TensorSpec(name, m.hf_shape, out_dtype) for m in maps for name in m.hf_names]
    written = shard_files(plan, max_shard_bytes) + [INDEX_FILE, CONFIG_FILE] + side
    try:
        os.makedirs(out_dir, exist_ok=True)
        files = write_safetensors(out_dir, plan, tensors(), max_shard_bytes)
        with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        for name in side:
            shutil.copyfile(os.path.join(side_dir, name), os.path.join(out_dir, name))
    except LeafDamaged:
        _remove_output(out_dir, created, written)
        damaged = reader.damaged("params/" + m.leaf for m in maps)
        raise DamagedCheckpoint("CKPT: " + damaged_step_message(
            step_dir, metadata, damaged, older, "nothing was written to OUT_DIR")) from None
    except OSError as error:
        _remove_output(out_dir, created, written)
        raise ExportWriteError(f"OUT_DIR: writing {out_dir} failed, nothing was left there "
                               f"({error.strerror or error})") from None
    except BaseException:
        _remove_output(out_dir, created, written)
        raise
    return files
