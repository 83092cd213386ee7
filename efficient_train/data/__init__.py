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
seq_len tokens, i.e. one document per row); `tokenizer` (a tokenizer.json or model
directory: a `text` or `jsonl` source is tokenized with it into a cache under
`cache_dir` on first use, cache.py; a `prepared` source must have been made with it);
`mixture` (`prepared` only: "DIR:WEIGHT,..." instead of `path`, mixture.py).
"""
from __future__ import annotations

import math
import stat
from typing import TYPE_CHECKING, TypeGuard

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
SOURCES = ("synthetic", "text", "tokens", "jsonl", "prepared")
_SYNTHETIC_SUCCESSORS = 3


def _get(data_cfg: ml_collections.ConfigDict, name: str) -> object:
    if name not in data_cfg:
        raise DataError(f"data.{name}: missing from the data config")
    return data_cfg[name]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _eos_id(data_cfg: ml_collections.ConfigDict) -> int | None:
    eos = data_cfg.get("eos_id", None)
    return None if eos is None or eos < 0 else int(eos)


def parse_mixture(text: str) -> list[tuple[str, float]]:
    """"dirA:0.7,dirB:0.3" -> [(dirA, 0.7), (dirB, 0.3)]; DataError naming the entry when malformed."""
    entries = [entry.strip() for entry in text.split(",")]
    parsed = []
    for entry in entries:
        path, sep, weight = entry.rpartition(":")
        try:
            value = float(weight) if sep and path else math.nan
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise DataError(f"data.mixture: entry {entry!r} must be DIR:WEIGHT with a weight > 0, e.g. "
                            "'data/web:0.7,data/code:0.3'")
        parsed.append((path, value))
    return parsed


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
    tokenizer = data_cfg.get("tokenizer", "")
    if not isinstance(tokenizer, str):
        raise DataError(f"data.tokenizer: {tokenizer!r} must be a string")
    if tokenizer:
        if source not in ("text", "jsonl", "prepared"):
            raise DataError(f"data.tokenizer: applies to the 'text', 'jsonl' and 'prepared' sources, not {source!r}")
        mode = stat_path(tokenizer, "data.tokenizer").st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise DataError(f"data.tokenizer: '{tokenizer}' is {file_kind(mode)}; give a tokenizer.json or a "
                            "model directory")
    mixture = data_cfg.get("mixture", "")
    if mixture and source != "prepared":
        raise DataError(f"data.mixture: mixes prepared directories; set data.source=prepared (not {source!r})")

    if source == "prepared":
        if bool(path) == bool(mixture):
            raise DataError("data.path: source 'prepared' reads one directory (data.path) or a mixture "
                            "(data.mixture='DIR:WEIGHT,...'); set exactly one of them")
        dirs = [d for d, _ in parse_mixture(mixture)] if mixture else [path]
        for directory in dirs:
            what = "data.mixture" if mixture else "data.path"
            if not stat.S_ISDIR(stat_path(directory, what).st_mode):
                raise DataError(f"{what}: '{directory}' is not a directory; give what `efficient-train prepare` "
                                "wrote")
        return
    if source == "synthetic":
        if vocab_size < _SYNTHETIC_SUCCESSORS:
            raise DataError(
                f"data.source: 'synthetic' needs vocab_size >= {_SYNTHETIC_SUCCESSORS}; "
                f"the model has {vocab_size}"
            )
        return
    if source == "text":
        if vocab_size < 256 and not tokenizer:
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
    cache_dir: str | None = None,
) -> DataLoader:
    """The loader `data_cfg` describes, yielding this process's rows of each global batch.

    column_order: the sequence-parallel layout's reorder of every row (see DataLoader).
    cache_dir: where a raw-text source with `data.tokenizer` keeps its tokens (cache.py).
    """
    from efficient_train.data.loader import DataLoader  # flax (Batch) loads with the loader, not with the package

    check_data_config(data_cfg, vocab_size)
    common = dict(seq_len=data_cfg.seq_len, global_batch_size=global_batch_size, seed=data_cfg.seed,
                  process_index=process_index, process_count=process_count, shuffle=data_cfg.shuffle,
                  column_order=column_order)
    tokenizer_path = data_cfg.get("tokenizer", "")
    tokenizer = None
    if tokenizer_path:
        from efficient_train.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path, "data.tokenizer")
        if tokenizer.vocab_size > vocab_size:
            raise DataError(f"data.tokenizer: '{tokenizer_path}' has {tokenizer.vocab_size} tokens; model.vocab_size "
                            f"{vocab_size} is smaller; set model.vocab_size >= {tokenizer.vocab_size}")
    source: TokenSource
    if data_cfg.source == "prepared":
        from efficient_train.data.prepared import PreparedSource

        mixture = data_cfg.get("mixture", "")
        entries = parse_mixture(mixture) if mixture else [(data_cfg.path, 1.0)]
        what = "data.mixture" if mixture else "data.path"
        sources = [PreparedSource(d, vocab_size=vocab_size, what=what) for d, _ in entries]
        for (directory, _), prepared in zip(entries, sources):
            if tokenizer is not None and prepared.tokenizer_fingerprint != tokenizer.fingerprint:
                raise DataError(f"data.tokenizer: '{directory}' was prepared with another tokenizer than "
                                f"'{tokenizer_path}'; prepare it with this one, or leave data.tokenizer empty")
        if not mixture:
            return DataLoader(sources[0], **common)
        from efficient_train.data.mixture import MixtureLoader

        return MixtureLoader(sources, [d for d, _ in entries], [w for _, w in entries], **common)
    if tokenizer is not None:
        from efficient_train.data.cache import cached_source

        if cache_dir is None:
            raise DataError("data.tokenizer: a raw-text source with a tokenizer needs a cache directory "
                            "(build_loader(cache_dir=...); the trainer uses <workdir>/data_cache)")
        source = cached_source(data_cfg.source, data_cfg.path, data_cfg.jsonl_field, data_cfg.max_bytes,
                               tokenizer, tokenizer_path, cache_dir, vocab_size)
    elif data_cfg.source == "synthetic":
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
    return DataLoader(source, **common)
