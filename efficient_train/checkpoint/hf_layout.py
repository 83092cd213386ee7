"""The Hugging Face Llama layout on disk: tensor names, shapes, and safetensors files.

Owns the facts that connect our parameter tree to a Hugging Face `LlamaForCausalLM`
directory, so `efficient_train.hf` (load, import, export) never spells a tensor name:

- Names. Each parameter leaf ("blocks/attn/q/kernel") maps to HF tensors
  ("model.layers.{i}.self_attn.q_proj.weight"): one per layer for a stacked leaf
  (scan_layers=True, leading layers axis), one for an unscanned "blocks/{i}/..." leaf or
  a top-level one. The leaves themselves come from the model (`nnx.eval_shape` of
  `Llama`), so a parameter this table does not know is an error, never a silent skip.
- Shapes. Our kernels are (in..., out...) with heads kept as their own axis (q: (embed,
  heads, head_dim), o: (heads, head_dim, embed)); a torch Linear weight is [out, in] with
  heads flattened head-major. So a kernel maps by a reshape to [in, out] and a
  transpose, nothing else: our RoPE is rotate-half, the convention HF Llama weights
  are stored in, so q and k need no permutation of their rows. Norm scales and the
  embedding table have the same layout on both sides.
- Files. safetensors is an 8-byte little-endian header length, a JSON header (name ->
  dtype, shape, byte offsets), then the raw little-endian bytes. It is read and written
  here directly rather than through the `safetensors` package because (a) export must
  stream: the package serializes a file from a dict of whole in-memory tensors, while
  the header can be written from shapes alone and the bytes appended one tensor at a
  time, so peak host memory is one tensor (plus the checkpoint leaf it came from), not
  a 2 GiB shard; and (b) reading bf16 tensors into numpy without torch depends on the
  package version, while here it is one numpy dtype (jax's bfloat16). Shards are named and indexed
  as `save_pretrained` does (`model-0000k-of-0000n.safetensors` plus
  `model.safetensors.index.json`; one shard is plain `model.safetensors`), with the
  `{"format": "pt"}` header metadata transformers requires.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_train.checkpoint.manager import leaf_paths
from efficient_train.checkpoint.metadata import CheckpointError
from efficient_train.models import Llama, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# Our name inside a decoder block -> (HF name inside "model.layers.{i}.", input dims of
# our kernel, or None where both sides share one layout).
LAYER_TENSORS: dict[str, tuple[str, int | None]] = {
    "attn_norm/scale": ("input_layernorm.weight", None),
    "attn/q/kernel": ("self_attn.q_proj.weight", 1),
    "attn/k/kernel": ("self_attn.k_proj.weight", 1),
    "attn/v/kernel": ("self_attn.v_proj.weight", 1),
    "attn/o/kernel": ("self_attn.o_proj.weight", 2),
    "mlp_norm/scale": ("post_attention_layernorm.weight", None),
    "mlp/gate/kernel": ("mlp.gate_proj.weight", 1),
    "mlp/up/kernel": ("mlp.up_proj.weight", 1),
    "mlp/down/kernel": ("mlp.down_proj.weight", 1),
}
TOP_TENSORS: dict[str, tuple[str, int | None]] = {
    "embed/embedding": ("model.embed_tokens.weight", None),
    "final_norm/scale": ("model.norm.weight", None),
    "lm_head/kernel": ("lm_head.weight", 1),
}
# Present in some HF files but derived, not learned: RoPE's inverse frequencies, and the
# output head of a tied model (transformers ties it to the embedding on load).
DERIVED_SUFFIX = "rotary_emb.inv_freq"
TIED_HEAD = "lm_head.weight"

# safetensors dtype names <-> numpy dtypes (all little-endian).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class HFError(CheckpointError):
    """A Hugging Face directory or config that cannot be used as asked, as one line."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter leaf of ours and the HF tensor(s) it is made of."""

    leaf: str  # name under "params/", e.g. "blocks/attn/q/kernel"
    hf_names: tuple[str, ...]  # one per layer when stacked, else exactly one
    stacked: bool  # the leaf has a leading layers axis
    shape: tuple[int, ...]  # our shape of one HF tensor's worth (one layer when stacked)
    n_in: int | None  # a kernel (in..., out...) with n_in input dims; None: same layout

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        return (len(self.hf_names), *self.shape) if self.stacked else self.shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return self.shape
        return (math.prod(self.shape[self.n_in:]), math.prod(self.shape[: self.n_in]))

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """Our array of `shape` -> the HF tensor (a torch Linear weight is [out, in])."""
        if self.n_in is None:
            return value
        return value.reshape(self.hf_shape[::-1]).T

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        """The HF tensor -> our array of `shape`."""
        if self.n_in is None:
            return tensor
        return tensor.T.reshape(self.shape)


def _map_leaf(leaf: str, shape: tuple[int, ...], num_layers: int) -> TensorMap:
    if leaf in TOP_TENSORS:
        name, n_in = TOP_TENSORS[leaf]
        return TensorMap(leaf, (name,), False, shape, n_in)
    head, _, rest = leaf.partition("/")
    index, _, inner = rest.partition("/")
    if head == "blocks" and index.isdigit() and inner in LAYER_TENSORS:  # scan_layers=False
        name, n_in = LAYER_TENSORS[inner]
        return TensorMap(leaf, (f"model.layers.{index}.{name}",), False, shape, n_in)
    if head == "blocks" and rest in LAYER_TENSORS:  # scan_layers=True: [layers, ...]
        name, n_in = LAYER_TENSORS[rest]
        names = tuple(f"model.layers.{i}.{name}" for i in range(num_layers))
        return TensorMap(leaf, names, True, shape[1:], n_in)
    raise HFError(f"parameter {leaf} has no Hugging Face Llama counterpart")


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter leaf of `Llama(cfg)`, in the state's (sorted) leaf order."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return [_map_leaf(leaf, tuple(value.shape), cfg.num_layers) for leaf, value in leaf_paths(params)]


def _read_header(path: str) -> tuple[dict, int]:
    """A safetensors file's header (without __metadata__) and where its data starts."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise HFError(f"{path}: not a readable safetensors file ({error})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsDir:
    """The tensors of a HF directory (one file or an indexed set of shards), read one at a time."""

    def __init__(self, hf_dir: str) -> None:
        index_path, single_path = os.path.join(hf_dir, INDEX_FILE), os.path.join(hf_dir, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            paths = sorted({os.path.join(hf_dir, file) for file in weight_map.values()})
        elif os.path.isfile(single_path):
            paths = [single_path]
        else:
            raise HFError(
                f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read; "
                "re-save others with save_pretrained(..., safe_serialization=True))")
        # name -> (file, absolute byte offset, dtype, shape)
        self.tensors: dict[str, tuple[str, int, np.dtype, tuple[int, ...]]] = {}
        for path in paths:
            header, data_start = _read_header(path)
            for name, entry in header.items():
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise HFError(f"{name}: dtype {entry['dtype']} is not supported; "
                                  f"allowed: {', '.join(SAFETENSORS_DTYPES)}")
                begin = data_start + entry["data_offsets"][0]
                self.tensors[name] = (path, begin, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))

    def check(self, maps: Sequence[TensorMap]) -> None:
        """Every tensor the model needs is present with its shape, and nothing else is."""
        expected = {name: m.hf_shape for m in maps for name in m.hf_names}
        for name, shape in expected.items():
            if name not in self.tensors:
                raise HFError(f"{name}: missing from the safetensors files")
            if self.tensors[name][3] != shape:
                raise HFError(f"{name}: shape {list(self.tensors[name][3])} does not match config.json "
                              f"(expected {list(shape)})")
        unknown = sorted(name for name in self.tensors if name not in expected
                         and not name.endswith(DERIVED_SUFFIX) and name != TIED_HEAD)
        if unknown:
            raise HFError(f"tensors this Llama config has no place for: {', '.join(unknown[:3])}"
                          + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))

    def read(self, name: str) -> np.ndarray:
        path, begin, dtype, shape = self.tensors[name]
        with open(path, "rb") as f:
            f.seek(begin)
            return np.fromfile(f, dtype=dtype, count=math.prod(shape)).reshape(shape)

    def read_leaf(self, m: TensorMap, dtype: np.dtype) -> np.ndarray:
        """Our leaf `m` in `dtype`, assembled from its HF tensors (stacked: one layer at a time)."""
        if not m.stacked:
            return m.from_hf(self.read(m.hf_names[0])).astype(dtype)
        out = np.empty(m.leaf_shape, dtype)
        for i, name in enumerate(m.hf_names):
            out[i] = m.from_hf(self.read(name))
        return out


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _split_shards(plan: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in plan:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(shard: Sequence[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned, as the format recommends
    return struct.pack("<Q", len(text)) + text


def write_safetensors(out_dir: str, plan: Sequence[TensorSpec], tensors: Iterable[tuple[str, np.ndarray]],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors`, which must come in `plan`'s order, as shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own); returns the file names.

    Each shard's header is written from the plan before its bytes, so only the tensor
    being written is ever held.
    """
    shards = _split_shards(plan, max_shard_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    stream = iter(tensors)
    weight_map: dict[str, str] = {}
    for file, shard in zip(files, shards):
        with open(os.path.join(out_dir, file), "wb") as f:
            f.write(_header_bytes(shard))
            for spec in shard:
                name, tensor = next(stream)
                if (name, tensor.shape, tensor.dtype) != (spec.name, spec.shape, spec.dtype):
                    raise ValueError(f"{name} {tensor.shape} {tensor.dtype} does not follow the planned "
                                     f"{spec.name} {spec.shape} {spec.dtype}")
                np.ascontiguousarray(tensor).tofile(f)
                weight_map[name] = file
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in plan)}, "weight_map": weight_map}
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return files
