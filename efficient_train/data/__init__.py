"""The data pipeline: token sources -> packed rows -> deterministic per-process batches.

`build_loader(config.data, ...)` is the one entry point the trainer needs;
`check_data_config` validates the same fields up front with one-line errors that name
the field (`data.<field>: ...`), so a bad config fails before any model is built.
Every error of the package is a `DataError` (an InputError: the CLI prints its one
line and exits with status 2); it names the file and the position (line, token
offset) where there is one. `check_data_config` looks at paths with `os.stat` only:
a path that is not a regular file (or, for `text`, a directory) is refused unopened.

Errors that can arrive mid-run: `next(loader)` raises DataError when a token file
shrank under the run or holds an id >= vocab_size at a position not checked at start
(files above TokenFileSource.EAGER_CHECK_BYTES), and DataReadError (a RunError) on an
I/O error. The loader's step does not advance on a failed batch, so its state() still
matches the last step that trained.

Optional fields read with defaults (not required in the config): `eos_id` (tokens
source: split documents after this id; unset or negative: fixed-length documents of
seq_len tokens, i.e. one document per row).
"""
from __future__ import annotations

import stat
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from efficient_train.data.errors import DataError, DataReadError, file_kind, stat_path
from efficient_train.data.sources import (
    TOKEN_DTYPES,
    JsonlSource,
    SyntheticSource,
    TextSource,
    TokenFileSource,
    TokenSource,
)
from efficient_train.lazy import lazy_attributes

__all__ = [
    "Batch",
    "DataError",
    "DataLoader",
    "DataReadError",
    "JsonlSource",
    "LoaderState",
    "PackedWindows",
    "SyntheticSource",
    "TextSource",
    "TokenFileSource",
    "TokenSource",
    "build_loader",
    "check_data_config",
]
# Batch (a flax struct) and the packing and loader that build it are imported on first use, so
# config.py can read SOURCES and TOKEN_DTYPES from this package without importing jax
# (efficient_train/lazy.py).
__getattr__, __dir__ = lazy_attributes(__name__, {
    "Batch": "efficient_train.data.batch",
    **dict.fromkeys(["DataLoader", "LoaderState"], "efficient_train.data.loader"),
    "PackedWindows": "efficient_train.data.packing",
})

if TYPE_CHECKING:
    from efficient_train.data.batch import Batch
    from efficient_train.data.loader import DataLoader, LoaderState
    from efficient_train.data.packing import PackedWindows

# The allowed data.source names; config.py checks against this tuple (as DATA_SOURCES).
SOURCES = ("synthetic", "text", "tokens", "jsonl")
_SYNTHETIC_SUCCESSORS = 3


def _get(data_cfg: ml_collections.ConfigDict, name: str) -> object:
    if name not in data_cfg:
        raise DataError(f"data.{name}: missing from the data config")
    return data_cfg[name]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _eos_id(data_cfg: ml_collections.ConfigDict) -> int | None:
    eos = data_cfg.get("eos_id", None)
    return None if eos is None or eos < 0 else int(eos)


def check_data_config(data_cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
    """Raise DataError("data.<field>: ...") for the first invalid field; reads no data."""
    source = _get(data_cfg, "source")
    if source not in SOURCES:
        raise DataError(f"data.source: {source!r} is not one of {', '.join(map(repr, SOURCES))}")
    seq_len = _get(data_cfg, "seq_len")
    if not _is_int(seq_len) or seq_len < 1:
        raise DataError(f"data.seq_len: {seq_len!r} must be an int >= 1")
    seed = _get(data_cfg, "seed")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"data.seed: {seed!r} must be an int >= 0")
    if not isinstance(_get(data_cfg, "shuffle"), bool):
        raise DataError(f"data.shuffle: {data_cfg.shuffle!r} must be True or False")
    path = _get(data_cfg, "path")
    if not isinstance(path, str):
        raise DataError(f"data.path: {path!r} must be a string")

    if source == "synthetic":
        if vocab_size < _SYNTHETIC_SUCCESSORS:
            raise DataError(
                f"data.source: 'synthetic' needs vocab_size >= {_SYNTHETIC_SUCCESSORS}; "
                f"the model has {vocab_size}"
            )
        return
    if source == "text":
        if vocab_size < 256:
            raise DataError(
                f"data.source: 'text' is byte-level and needs vocab_size >= 256; the model has {vocab_size}"
            )
        if path:
            mode = stat_path(path, "data.path").st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise DataError(f"data.path: '{path}' is {file_kind(mode)}; give a regular file, a directory "
                                "or '' (stdlib sources)")
        max_bytes = _get(data_cfg, "max_bytes")
        if not _is_int(max_bytes) or max_bytes < 1:
            raise DataError(f"data.max_bytes: {max_bytes!r} must be an int >= 1")
        return
    if not path:
        raise DataError(f"data.path: '' is not a file; source {source!r} needs one")
    mode = stat_path(path, "data.path").st_mode
    if not stat.S_ISREG(mode):
        raise DataError(f"data.path: '{path}' is {file_kind(mode)}; source {source!r} needs a regular file")
    if source == "tokens":
        dtype = _get(data_cfg, "token_dtype")
        if dtype not in TOKEN_DTYPES:
            allowed = ", ".join(map(repr, TOKEN_DTYPES))
            raise DataError(f"data.token_dtype: {dtype!r} is not one of {allowed}")
        eos = _eos_id(data_cfg)
        if eos is not None and eos >= vocab_size:
            raise DataError(f"data.eos_id: {eos} must be below vocab_size {vocab_size}")
    else:
        field = _get(data_cfg, "jsonl_field")
        if not isinstance(field, str) or not field:
            raise DataError(f"data.jsonl_field: {field!r} must be a non-empty string")


def build_loader(
    data_cfg: ml_collections.ConfigDict,
    *,
    vocab_size: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    column_order: np.ndarray | None = None,
) -> DataLoader:
    """The loader `data_cfg` describes, yielding this process's rows of each global batch.

    column_order: the sequence-parallel layout's reorder of every row (see DataLoader).
    """
    from efficient_train.data.loader import DataLoader  # flax (Batch) loads with the loader, not with the package

    check_data_config(data_cfg, vocab_size)
    source: TokenSource
    if data_cfg.source == "synthetic":
        source = SyntheticSource(vocab_size, data_cfg.seed, successors=_SYNTHETIC_SUCCESSORS)
    elif data_cfg.source == "text":
        source = TextSource(data_cfg.path, max_bytes=data_cfg.max_bytes)
    elif data_cfg.source == "tokens":
        source = TokenFileSource(
            data_cfg.path,
            data_cfg.token_dtype,
            doc_len=data_cfg.seq_len,
            eos_id=_eos_id(data_cfg),
            vocab_size=vocab_size,
        )
    else:
        source = JsonlSource(data_cfg.path, data_cfg.jsonl_field, vocab_size=vocab_size)
    return DataLoader(
        source,
        seq_len=data_cfg.seq_len,
        global_batch_size=global_batch_size,
        seed=data_cfg.seed,
        process_index=process_index,
        process_count=process_count,
        shuffle=data_cfg.shuffle,
        column_order=column_order,
    )
