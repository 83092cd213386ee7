"""The LoRA checkpoint tools: `checkpoint merge-lora`, and what `export-hf` does with a LoRA run.

A LoRA checkpoint holds adapters (`params/.../lora/a`, `.../lora/b`) and their optimizer
state; its metadata's `finetune.base` names the base step and pins it by fingerprint
(train/finetune.py). `LoRASource` reads the two together, every leaf verified as it is
read and the base's fingerprint checked before anything is written: `read(leaf)` gives
a base parameter with its adapter merged in (`models/lora.merge_delta`: W + alpha/rank *
A @ B, in fp32, cast back to the base's dtype), one parameter in host memory at a time.

- `merge_lora(src, dst)` writes the merged parameters as a params-only checkpoint with
  the base's model config (and copies the base's tokenizer files), which trains,
  evaluates, exports and generates as any full checkpoint.
- `write_peft(...)` (`export-hf --adapters_only`) writes the PEFT layout:
  `adapter_config.json` and `adapter_model.safetensors` with PEFT's key names
  (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [rank, in],
  `...lora_B.weight` [out, rank]; the embedding's `lora_embedding_A` [rank, vocab] and
  `lora_embedding_B` [hidden, rank]), so `PeftModel.from_pretrained` loads it onto the
  base exported with `export-hf`.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import numpy as np

from efficient_train.checkpoint.metadata import CheckpointError, CheckpointMetadata, DamagedCheckpoint
from efficient_train.checkpoint.paths import check_destination, first_missing_dir, refuse_existing_steps, resolve_step
from efficient_train.checkpoint.verify import LeafDamaged, VerifiedReader, read_step_metadata
from efficient_train.checkpoint.writer import write_checkpoint
from efficient_train.models.choices import LORA_TARGETS
from efficient_train.models.llama.hf_names import TensorMap
from efficient_train.models.lora import LoRAConfig, merge_delta
from efficient_train.tools.report import model_config
from efficient_train.tools.safetensors import HFError, conversion_dtype, tensor_maps, write_safetensors_file
from efficient_train.train.finetune import PARAMS_PREFIX, base_fingerprint

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Our target -> the Hugging Face module PEFT adapts.
HF_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj", "embed": "embed_tokens"}
ADAPTER = "lora"


def adapter_of(leaf: str) -> str | None:
    """The adapter leaf prefix ("blocks/attn/q/lora") of a kernel or embedding leaf, else None."""
    owner, _, name = leaf.rpartition("/")
    return f"{owner}/{ADAPTER}" if name in ("kernel", "embedding") else None


class LoRASource:
    """A LoRA checkpoint step and its base, read leaf by leaf with the adapters merged in."""

    def __init__(self, src: str, flag: str = "SRC") -> None:
        step_dir, self.older = resolve_step(src, flag)
        self.step_dir = step_dir
        self.metadata = read_step_metadata(step_dir)
        finetune = self.metadata.finetune
        if finetune is None:
            raise CheckpointError(f"{flag}: {step_dir} is not a LoRA checkpoint (its metadata.json has no finetune "
                                  "section); a full checkpoint needs no merging")
        lora = finetune["lora"]
        self.lora = LoRAConfig(lora["rank"], float(lora["alpha"]), float(lora.get("dropout", 0.0)),
                               tuple(t for t in lora["targets"] if t in LORA_TARGETS))
        base = finetune["base"]
        self.base_dir = base["path"]
        if not os.path.isdir(self.base_dir):
            raise CheckpointError(f"{flag}: its base {self.base_dir} (step {base['step']}) is not there any more; "
                                  "restore it (the adapters mean nothing without it)")
        self.base_metadata: CheckpointMetadata = read_step_metadata(self.base_dir)
        if base_fingerprint(self.base_metadata) != base["fingerprint"]:
            raise CheckpointError(f"{flag}: its base {self.base_dir} no longer holds the parameters the adapters were "
                                  f"trained on (fingerprint {base_fingerprint(self.base_metadata)}, recorded "
                                  f"{base['fingerprint']}); nothing was written")
        self.config = model_config(self.base_metadata, self.base_dir)
        self._adapters = VerifiedReader(step_dir, self.metadata)
        self._base = VerifiedReader(self.base_dir, self.base_metadata)

    def base_leaves(self) -> list[str]:
        """The base's parameter leaf names (without "params/"), in its metadata's order."""
        return [name[len(PARAMS_PREFIX):] for name in self.base_metadata.leaves if name.startswith(PARAMS_PREFIX)]

    def has_adapter(self, leaf: str) -> bool:
        prefix = adapter_of(leaf)
        return prefix is not None and f"{PARAMS_PREFIX}{prefix}/a" in self.metadata.leaves

    def adapter(self, leaf: str) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of a kernel or embedding leaf, verified."""
        prefix = f"{PARAMS_PREFIX}{adapter_of(leaf)}"
        return self._read(self._adapters, prefix + "/a"), self._read(self._adapters, prefix + "/b")

    def read(self, leaf: str) -> np.ndarray:
        """The base parameter `leaf` (no "params/") with its adapter merged in, if it has one."""
        value = self._read(self._base, PARAMS_PREFIX + leaf)
        if not self.has_adapter(leaf):
            return value
        a, b = self.adapter(leaf)
        return merge_delta(value, a, b, self.lora.scale)

    def _read(self, reader: VerifiedReader, name: str) -> np.ndarray:
        try:
            return reader.read(name)
        except LeafDamaged as error:
            raise DamagedCheckpoint(f"{error}; nothing was written") from None


def merge_lora(src: str, dst: str) -> str:
    """Write the merged parameters of LoRA checkpoint `src` as a params-only step in `dst`."""
    source = LoRASource(src)
    check_destination(dst, "DST")
    refuse_existing_steps(dst, "DST")
    leaves = ((PARAMS_PREFIX + leaf, source.read(leaf)) for leaf in source.base_leaves())
    step_dir = write_checkpoint(dst, source.metadata.step, leaves, model=source.base_metadata.model, optimizer=None,
                                seed=source.metadata.seed, flag="DST")
    _copy_side_files(source.base_dir, dst)
    return step_dir


def _copy_side_files(base_step_dir: str, dst: str) -> None:
    """The base's tokenizer files travel with the merged checkpoint (tools/hf.py's layout)."""
    from efficient_train.tools.hf import TOKENIZER_DIR, side_files

    side_dir, names = side_files(base_step_dir)
    if names:
        os.makedirs(os.path.join(dst, TOKENIZER_DIR), exist_ok=True)
        for name in names:
            shutil.copyfile(os.path.join(side_dir, name), os.path.join(dst, TOKENIZER_DIR, name))


def _peft_tensors(source: LoRASource, maps: list[TensorMap], dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """PEFT's (name, tensor in `dtype`) pairs of every adapter, layer by layer."""
    for m in maps:
        if not source.has_adapter(m.leaf):
            continue
        a, b = source.adapter(m.leaf)
        layers_a, layers_b = (a, b) if m.stacked else ([a], [b])
        for hf_name, a_layer, b_layer in zip(m.hf_names, layers_a, layers_b):
            module = PEFT_PREFIX + hf_name.removesuffix(".weight")
            rank = a_layer.shape[-1]
            lora_a = np.asarray(a_layer).astype(dtype).reshape(-1, rank).T  # [rank, in]
            lora_b = np.asarray(b_layer).astype(dtype).reshape(rank, -1).T  # [out, rank]
            if m.leaf == "embed/embedding":  # PEFT's embedding layout: A [rank, vocab], B [hidden, rank]
                yield f"{module}.lora_embedding_A", np.ascontiguousarray(lora_a)
                yield f"{module}.lora_embedding_B", np.ascontiguousarray(lora_b)
            else:
                yield f"{module}.lora_A.weight", np.ascontiguousarray(lora_a)
                yield f"{module}.lora_B.weight", np.ascontiguousarray(lora_b)


def peft_config(lora: LoRAConfig) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields for these adapters."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(HF_MODULES[t] for t in lora.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
    }


def write_peft(src: str, out_dir: str, dtype: str | None = None) -> list[str]:
    """`export-hf --adapters_only`: the adapters of LoRA checkpoint `src` in the PEFT layout, in
    `dtype` (default: the checkpoint's param_dtype); returns the files."""
    source = LoRASource(src, "CKPT")
    out_dtype = conversion_dtype(dtype or source.config.param_dtype, "--dtype")
    maps = tensor_maps(source.config)
    check_destination(out_dir, "OUT_DIR")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise HFError(f"OUT_DIR: {out_dir!r} is not empty; choose a new directory")
    tensors = list(_peft_tensors(source, maps, out_dtype))  # adapters are small; read (and verified) before writing
    created = first_missing_dir(out_dir)
    files = [ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE]
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_safetensors_file(os.path.join(out_dir, ADAPTER_WEIGHTS_FILE), tensors)
        with open(os.path.join(out_dir, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(peft_config(source.lora), f, indent=2)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for name in files:
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        raise
    return files
