"""Evaluation sets: the `eval.sets` grammar, and each set's own loader, apart from training's.

    validation            the validation split of the training data (data.source=prepared, data.path)
    NAME=DIR[:SPLIT]      a split of another prepared directory: validation (default) or train (a corpus
                          prepared for evaluation alone)
    NAME=SOURCE:PATH      a file or directory read as data.source=SOURCE reads it (text, jsonl, tokens),
                          with the run's data.tokenizer, token_dtype, jsonl_field and eos_id

Entries are comma-separated; names are unique, of letters, digits, '_', '-' and '.', since
they become metric keys (`eval/<name>/loss`). `parse_eval_sets` checks the text alone
(config.validate_fields runs it before jax starts); `check_eval_sets` looks at the paths
with os.stat only; `build_eval_set` opens one.

An evaluation set is read in order (no shuffle), from its first window, by its own
`DataLoader`: every evaluation sees the same batches, so evaluations along a run are
comparable, and the training loader's stream and resume state are never touched. A set
smaller than the batches asked for is read once, whole: the rows past its end (the loader
would wrap around to its start) get zero loss weight.
"""
from __future__ import annotations

import dataclasses
import math
import re
import stat
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from efficient_train.data.errors import DataError, stat_path
from efficient_train.data.manifest import SPLITS

if TYPE_CHECKING:
    from efficient_train.data.batch import Batch
    from efficient_train.data.loader import DataLoader

VALIDATION = "validation"
FILE_SOURCES = ("text", "jsonl", "tokens")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    """One parsed entry: a metric name, a data source name (`prepared` or a FILE_SOURCES name) and its path."""

    name: str
    source: str
    path: str  # "" for `validation`: data.path
    split: str = "validation"  # of a prepared directory


def parse_eval_sets(text: str, field: str = "eval.sets") -> list[EvalSetSpec]:
    """The entries of `text` (see the module docstring); DataError naming `field` and the entry."""
    specs: list[EvalSetSpec] = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, target = entry.partition("=")
        if not sep:
            if entry != VALIDATION:
                raise DataError(f"{field}: entry {entry!r} must be 'validation', NAME=DIR[:train] (a prepared directory) or "
                                f"NAME=SOURCE:PATH with SOURCE one of {', '.join(FILE_SOURCES)}")
            spec = EvalSetSpec(VALIDATION, "prepared", "")
        else:
            name = name.strip()
            if not _NAME.fullmatch(name):
                raise DataError(f"{field}: name {name!r} in {entry!r} must be letters, digits, '_', '-' or '.'")
            source, colon, path = target.strip().partition(":")
            split = "validation"
            if not colon or source not in FILE_SOURCES:
                source, path = "prepared", target.strip()
                directory, colon, suffix = path.rpartition(":")
                if colon and suffix in SPLITS:
                    path, split = directory, suffix
            if not path:
                raise DataError(f"{field}: entry {entry!r} names no path")
            spec = EvalSetSpec(name, source, path, split)
        if any(s.name == spec.name for s in specs):
            raise DataError(f"{field}: the name {spec.name!r} is given twice; each set needs its own name")
        specs.append(spec)
    return specs


def check_eval_sets(text: str, data_cfg: ml_collections.ConfigDict, field: str = "eval.sets") -> None:
    """Each set's path exists and is of the right kind (os.stat only; nothing is opened)."""
    for spec in parse_eval_sets(text, field):
        if spec.name == VALIDATION and not spec.path:
            if data_cfg.source != "prepared" or not data_cfg.path:
                raise DataError(f"{field}: 'validation' is the validation split of data.path, which needs "
                                "data.source=prepared with data.path set (a mixture: name each directory, "
                                "NAME=DIR)")
            continue
        mode = stat_path(spec.path, field).st_mode
        directory_ok = spec.source in ("prepared", "text")
        if not (stat.S_ISREG(mode) or (directory_ok and stat.S_ISDIR(mode))) or (
                spec.source == "prepared" and not stat.S_ISDIR(mode)):
            kind = "a directory prepare wrote" if spec.source == "prepared" else (
                "a file or a directory" if directory_ok else "a regular file")
            raise DataError(f"{field}: '{spec.path}' of set {spec.name!r} is not {kind}")


class EvalSet:
    """One named set: its loader (in order, this process's rows) and what its batches cover."""

    def __init__(self, name: str, loader: DataLoader, process_index: int) -> None:
        self.name = name
        self.loader = loader
        self.bytes_per_token = loader.bytes_per_token
        self._first_row = process_index * loader.local_batch_size

    def num_batches(self, steps: int) -> int:
        """`steps` batches, or fewer when the set ends sooner (0: the whole set)."""
        whole = math.ceil(self.loader.num_windows / self.loader.global_batch_size)
        return whole if steps == 0 else min(steps, whole)

    def batch(self, index: int) -> Batch:
        """This process's rows of batch `index`; rows past the set's end weigh nothing."""
        batch = self.loader.batch_at(index)
        samples = index * self.loader.global_batch_size + self._first_row + np.arange(self.loader.local_batch_size)
        past_end = samples >= self.loader.num_windows
        if past_end.any():
            batch = dataclasses.replace(batch, loss_weights=np.where(past_end[:, None], 0.0, batch.loss_weights).astype(np.float32))
        return batch


def build_eval_set(spec: EvalSetSpec, data_cfg: ml_collections.ConfigDict, *, vocab_size: int,
                   global_batch_size: int, process_index: int, process_count: int,
                   column_order: np.ndarray | None, cache_dir: str | None) -> EvalSet:
    """The set `spec` names, read with the run's seq_len, tokenizer and layout, unshuffled."""
    from efficient_train.data import build_loader
    from efficient_train.data.loader import DataLoader
    from efficient_train.data.prepared import PreparedSource

    common = dict(seq_len=data_cfg.seq_len, global_batch_size=global_batch_size, seed=0, shuffle=False,
                  process_index=process_index, process_count=process_count, column_order=column_order)
    if spec.source == "prepared":
        directory = spec.path or data_cfg.path
        source = PreparedSource(directory, spec.split, vocab_size=vocab_size, what=f"eval.sets {spec.name!r}")
        tokenizer = data_cfg.get("tokenizer", "")
        if tokenizer:
            from efficient_train.data.tokenizer import load_tokenizer

            if source.tokenizer_fingerprint != load_tokenizer(tokenizer, "data.tokenizer").fingerprint:
                raise DataError(f"eval.sets: set {spec.name!r} ('{directory}') was prepared with another tokenizer "
                                f"than data.tokenizer '{tokenizer}'")
        return EvalSet(spec.name, DataLoader(source, **common), process_index)
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.update(source=spec.source, path=spec.path, mixture="", shuffle=False, seed=0)
    try:
        loader = build_loader(cfg, vocab_size=vocab_size, global_batch_size=global_batch_size,
                              process_index=process_index, process_count=process_count, column_order=column_order,
                              cache_dir=cache_dir)
    except DataError as error:
        raise DataError(f"eval.sets: set {spec.name!r}: {error}") from None
    return EvalSet(spec.name, loader, process_index)
