"""The Hugging Face layout on disk: safetensors files, and every leaf of our model mapped to them.

`tensor_maps(cfg)` lists the leaves of `Llama(cfg)` with their HF tensors (the names
and shapes are models/llama/hf_names.py's table), so `tools/hf.py` (load, import,
export) never spells a tensor name, and a leaf the table does not know is an HFError.

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

from efficient_train.checkpoint.metadata import CheckpointError
from efficient_train.models.llama.config import ModelConfig
from efficient_train.models.llama.hf_names import DERIVED_SUFFIX, TIED_HEAD, TensorMap, map_leaf, moe_family
from efficient_train.models.llama.model import Llama
from efficient_train.tree_paths import leaf_paths

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


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


# The dtypes an import or export converts tensors to (`--dtype`, `param_dtype`), by their config names.
CONVERSION_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


def conversion_dtype(name: str, field: str) -> np.dtype:
    """The numpy dtype of conversion dtype `name`; an HFError naming `field` for any other name."""
    if name not in CONVERSION_DTYPES:
        raise HFError(f"{field}: {name!r} is not allowed; choose one of {', '.join(CONVERSION_DTYPES)}")
    return CONVERSION_DTYPES[name]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter leaf of `Llama(cfg)`, in the state's (sorted) leaf order."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    maps = []
    for leaf, value in leaf_paths(params):
        found = map_leaf(leaf, tuple(value.shape), cfg.num_layers, cfg.sandwich_norms,
                         moe_family(cfg.qk_norm) if cfg.num_experts else None)
        if found is None:
            raise HFError(f"parameter {leaf} has no Hugging Face counterpart")
        maps.append(found)
    return maps


MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors format's own limit on the JSON header
MAX_RANK = 32
HF_CACHE_SNAPSHOTS, HF_CACHE_BLOBS = "snapshots", "blobs"


def _kind(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    path: str  # the safetensors file
    begin: int  # absolute byte offset of the data in the file
    dtype: np.dtype
    shape: tuple[int, ...]


def _header_entry(path: str, name: str, entry: object, data_bytes: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked; offsets are
    relative to the start of the data, which holds `data_bytes` bytes."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise HFError(f"{where}: header entry is {_kind(entry)}; allowed: an object with dtype, shape, data_offsets")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise HFError(f"{where}: {field} missing from its header entry; allowed: an object with dtype, shape, "
                          "data_offsets")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise HFError(f"{where}: dtype {dtype!r} is not supported; allowed: {', '.join(SAFETENSORS_DTYPES)}")
    shape = entry["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**48 for n in shape)):
        raise HFError(f"{where}: shape {shape!r} is not allowed; allowed: a list of at most {MAX_RANK} "
                      "non-negative integers")
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets)
            or offsets[0] > offsets[1]):
        raise HFError(f"{where}: data_offsets {offsets!r} is not allowed; allowed: [begin, end] with "
                      "0 <= begin <= end")
    begin, end = offsets
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != needed:
        raise HFError(f"{where}: data_offsets {offsets} span {end - begin} bytes; allowed: exactly the {needed} "
                      f"bytes of a {dtype} tensor of shape {shape}")
    if end > data_bytes:
        raise HFError(f"{where}: data_offsets {offsets} run past the end of the file (it holds {data_bytes} bytes "
                      "of data): the file is truncated, e.g. an interrupted download")
    return SAFETENSORS_DTYPES[dtype], tuple(shape), begin, end


def _read_header(path: str) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int]:
    """A safetensors file's tensors, name -> (dtype, shape, begin, end) relative to the data,
    every entry checked against the file's size and the others; and where the data starts."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HFError(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length "
                              "(e.g. an interrupted download)")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise HFError(f"{path}: header length {length} is beyond the file size ({size} bytes): the file is "
                              "truncated or not safetensors")
            if length > MAX_HEADER_BYTES:
                raise HFError(f"{path}: header length {length} is not allowed; allowed: at most {MAX_HEADER_BYTES}")
            text = f.read(length)
    except OSError as error:
        raise HFError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise HFError(f"{path}: header is not valid JSON ({str(error)[:120]}); not a safetensors file?") from None
    if not isinstance(header, dict):
        raise HFError(f"{path}: header is {_kind(header)}; allowed: a JSON object of tensor name -> entry")
    header.pop("__metadata__", None)
    data_start, data_bytes = 8 + length, size - 8 - length
    entries = {name: _header_entry(path, name, entry, data_bytes) for name, entry in header.items()}
    previous = None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin == end:
            continue  # an empty tensor holds no bytes
        if previous is not None and begin < entries[previous][3]:
            raise HFError(f"{path}: tensor {name}: data_offsets {[begin, end]} overlap those of {previous} "
                          f"{list(entries[previous][2:])}; allowed: each tensor's bytes its own")
        previous = name
    return entries, data_start


def _allowed_roots(hf_dir: str) -> list[str]:
    """Where a weight file may lie: in the model directory, or, for a snapshot of the Hugging
    Face cache (`<repo>/snapshots/<revision>`, whose files link to `<repo>/blobs/`), there."""
    directory = os.path.abspath(hf_dir)
    roots = [os.path.realpath(directory)]
    parent = os.path.dirname(directory)
    if os.path.basename(parent) == HF_CACHE_SNAPSHOTS:
        roots.append(os.path.realpath(os.path.join(os.path.dirname(parent), HF_CACHE_BLOBS)))
    return roots


def _weight_file(hf_dir: str, name: object, source: str) -> str:
    """The path of weight file `name` (as the index names it), refused unless it is a plain
    file name inside the model directory that resolves (through links) to a file there."""
    allowed = "allowed: a file name inside the model directory"
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name):
        raise HFError(f"{source}: weight_map: file {name!r} is not allowed; {allowed}")
    path = os.path.join(hf_dir, name)
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root + os.sep) for root in _allowed_roots(hf_dir)):
        raise HFError(f"{source}: {name} resolves to {real}, outside the model directory; {allowed}")
    if not os.path.isfile(real):
        raise HFError(f"{source}: {name}: not found in {hf_dir!r}; {allowed}")
    return path


def _read_index(hf_dir: str, index_path: str) -> dict[str, str]:
    """The index's weight_map (tensor name -> file name), checked."""
    try:
        with open(index_path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as error:
        raise HFError(f"{index_path}: cannot be read ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:
        raise HFError(f"{index_path}: not valid JSON ({str(error)[:120]})") from None
    if not isinstance(raw, dict):
        raise HFError(f"{index_path}: is {_kind(raw)}; allowed: an object with a weight_map")
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFError(f"{index_path}: weight_map: is {'missing' if weight_map is None else _kind(weight_map)}; "
                      "allowed: a non-empty object of tensor name -> safetensors file name")
    for file in weight_map.values():
        _weight_file(hf_dir, file, index_path)
    return weight_map


class SafetensorsDir:
    """The tensors of a HF directory (one file or an indexed set of shards), read one at a time.

    Everything read from disk is checked before use: the index's file names stay inside
    the model directory, each header entry has a supported dtype, a shape and offsets
    that fit the file, and no two tensors share bytes. A problem is one HFError line
    naming the file and the field.
    """

    def __init__(self, hf_dir: str) -> None:
        index_path, single_path = os.path.join(hf_dir, INDEX_FILE), os.path.join(hf_dir, SINGLE_FILE)
        weight_map: dict[str, str] | None = None
        if os.path.isfile(index_path):
            weight_map = _read_index(hf_dir, index_path)
            files = sorted(set(weight_map.values()))
        elif os.path.lexists(single_path):
            _weight_file(hf_dir, SINGLE_FILE, single_path)
            files = [SINGLE_FILE]
        else:
            raise HFError(
                f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read; "
                "re-save others with save_pretrained(..., safe_serialization=True))")
        self.tensors: dict[str, StoredTensor] = {}
        for file in files:
            path = os.path.join(hf_dir, file)
            entries, data_start = _read_header(path)
            for name, (dtype, shape, begin, _) in entries.items():
                if name in self.tensors:
                    raise HFError(f"{path}: tensor {name} is also in {self.tensors[name].path}; "
                                  "allowed: each tensor in one file")
                self.tensors[name] = StoredTensor(path, data_start + begin, dtype, shape)
        for name, file in (weight_map or {}).items():
            if name in self.tensors and self.tensors[name].path != os.path.join(hf_dir, file):
                raise HFError(f"{index_path}: weight_map: {name} is said to be in {file} but is in "
                              f"{os.path.basename(self.tensors[name].path)}")
            if name not in self.tensors:
                raise HFError(f"{index_path}: weight_map: {name} is said to be in {file}, which does not hold it")

    def check(self, maps: Sequence[TensorMap]) -> None:
        """Every tensor the model needs is present with its shape, and nothing else is."""
        expected = {name: m.hf_shape for m in maps for name in m.hf_names}
        for name, shape in expected.items():
            if name not in self.tensors:
                raise HFError(f"{name}: missing from the safetensors files")
            if self.tensors[name].shape != shape:
                raise HFError(f"{name}: shape {list(self.tensors[name].shape)} does not match config.json "
                              f"(expected {list(shape)})")
        unknown = sorted(name for name in self.tensors if name not in expected
                         and not name.endswith(DERIVED_SUFFIX) and name != TIED_HEAD)
        if unknown:
            raise HFError(f"tensors this Llama config has no place for: {', '.join(unknown[:3])}"
                          + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))

    def read(self, name: str) -> np.ndarray:
        stored = self.tensors[name]
        count = math.prod(stored.shape)
        try:
            with open(stored.path, "rb") as f:
                f.seek(stored.begin)
                data = np.fromfile(f, dtype=stored.dtype, count=count)
        except OSError as error:
            raise HFError(f"{stored.path}: tensor {name}: cannot be read ({error.strerror or error})") from None
        if data.size != count:  # the file shrank since its header was checked
            raise HFError(f"{stored.path}: tensor {name}: the file ends inside its data (truncated)")
        return data.reshape(stored.shape)

    def read_leaf(self, m: TensorMap, dtype: np.dtype) -> np.ndarray:
        """Our leaf `m` in `dtype`, assembled from its HF tensors (stacked: one layer at a time)."""
        if not m.stacked:
            return m.from_hf(self.read(m.hf_names[0])).astype(dtype)
        out = np.empty(m.leaf_shape, dtype)
        parts = out.reshape(-1, *m.shape)  # a view: one row per HF tensor (layer, or layer x expert)
        for i, name in enumerate(m.hf_names):
            parts[i] = m.from_hf(self.read(name))
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


def shard_files(plan: Sequence[TensorSpec], max_shard_bytes: int) -> list[str]:
    """The file names `write_safetensors` gives the shards of `plan`, as save_pretrained does."""
    count = len(_split_shards(plan, max_shard_bytes))
    return [SINGLE_FILE] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def write_safetensors(out_dir: str, plan: Sequence[TensorSpec], tensors: Iterable[tuple[str, np.ndarray]],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors`, which must come in `plan`'s order, as shards of at most
    `max_shard_bytes` (a larger tensor gets a shard of its own); returns the file names.

    Each shard's header is written from the plan before its bytes, so only the tensor
    being written is ever held.
    """
    shards = _split_shards(plan, max_shard_bytes)
    files = shard_files(plan, max_shard_bytes)
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


def write_safetensors_file(path: str, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
    """One safetensors file of small tensors held in memory (a LoRA adapter's PEFT file)."""
    specs = [TensorSpec(name, tuple(value.shape), np.dtype(value.dtype)) for name, value in tensors]
    with open(path, "wb") as f:
        f.write(_header_bytes(specs))
        for _, value in tensors:
            np.ascontiguousarray(value).tofile(f)
