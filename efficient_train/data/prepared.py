"""PreparedSource: one split of a directory `prepare` wrote, memory-mapped.

The manifest lists the committed shards; only a complete manifest is read (an
interrupted prepare is refused with the command that finishes it). Each listed shard's
files must have exactly the sizes the manifest implies, checked at open, so a shard
that was cut short or replaced after prepare is refused by name before training starts.
Token files are memory-mapped (np.memmap, read-only): the kernel pages in what a batch
touches and nothing is copied at start-up. Unlike the `tokens` source (which reads with
preadv because a file truncated under a mapping kills the reader with SIGBUS), shards
are write-once files in a directory of their own, renamed into place whole; a prepared
directory must not be modified while a run reads it. Document offsets (8 bytes per
document) and chat loss masks are read the same way.

The fingerprint is the manifest's identity hash and the split, so a checkpoint resumes
only on the same prepared data, wherever the directory has moved.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from efficient_train.data.errors import DataError, stat_regular
from efficient_train.data.manifest import SPLITS, check_shard_size, read_manifest, shard_path
from efficient_train.data.sources import TokenSource
from efficient_train.data.tokenizer import Tokenizer


def open_manifest(directory: str | os.PathLike, what: str) -> dict[str, Any]:
    """The complete manifest of a prepared directory, or DataError saying why it cannot be read."""
    manifest = read_manifest(directory, what)
    if manifest is None:
        raise DataError(f"{what}: '{directory}' holds no manifest.json; make it with `efficient-train prepare "
                        "--output DIR ...`")
    if not manifest["complete"]:
        raise DataError(f"{what}: '{directory}' is not complete ({len(manifest['shards'])} shards committed); "
                        "rerun the prepare command that made it to finish it")
    return manifest


def identity_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest["identity"], sort_keys=True).encode()).hexdigest()[:16]


def _bytes_per_token(manifest: dict[str, Any], split: str, tokenizer_fingerprint: str) -> float | None:
    """The split's UTF-8 bytes per token: exactly 1 for the byte-level tokenizer, else from the
    shards' byte counts; None when a shard has none (chat, or prepared before they were counted)."""
    if tokenizer_fingerprint == Tokenizer.fingerprint:
        return 1.0
    counts = [shard[split] for shard in manifest["shards"].values() if shard[split]["documents"]]
    if not all("bytes" in count for count in counts):
        return None
    return sum(count["bytes"] for count in counts) / sum(count["tokens"] for count in counts)


class PreparedSource(TokenSource):
    """The documents of one split (`train` or `validation`) of a prepared directory."""

    def __init__(self, directory: str | os.PathLike, split: str = "train", *, vocab_size: int | None = None,
                 what: str = "data.path") -> None:
        if split not in SPLITS:
            raise DataError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
        self.directory = Path(directory)
        self.manifest = manifest = open_manifest(directory, what)
        identity = manifest["identity"]
        self.tokenizer_fingerprint = identity["tokenizer"]
        if vocab_size is not None and identity["vocab_size"] > vocab_size:
            raise DataError(f"{what}: '{directory}' was prepared with a tokenizer of {identity['vocab_size']} "
                            f"tokens; model.vocab_size {vocab_size} is smaller; set model.vocab_size >= "
                            f"{identity['vocab_size']}")
        self.vocab_size = vocab_size
        self.split = split
        self.has_loss_mask = identity["format"] == "chat"
        dtype = np.dtype(identity["token_dtype"])
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for unit in sorted(manifest["shards"], key=int):
            counts = manifest["shards"][unit][split]
            if not counts["documents"]:
                continue
            files = {kind: shard_path(directory, int(unit), split, kind) for kind in ("tokens", "docs", "mask")}
            check_shard_size(files["tokens"], counts["tokens"] * dtype.itemsize, what)
            check_shard_size(files["docs"], (counts["documents"] + 1) * 8, what)
            self._tokens.append(self._map(files["tokens"], dtype, what))
            self._offsets.append(self._map(files["docs"], np.dtype(np.int64), what))
            if self.has_loss_mask:
                check_shard_size(files["mask"], counts["tokens"], what)
                self._masks.append(self._map(files["mask"], np.dtype(np.uint8), what))
        if not self._tokens:
            raise DataError(f"{what}: '{directory}' has no {split} documents")
        self._lengths = np.concatenate([np.diff(offsets) for offsets in self._offsets])
        self.bytes_per_token = _bytes_per_token(manifest, split, self.tokenizer_fingerprint)
        self._first_doc = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        self._fingerprint = f"prepared-v1:{split}:{identity_hash(manifest)}"

    @staticmethod
    def _map(path: Path, dtype: np.dtype, what: str) -> np.ndarray:
        stat_regular(path, what)  # never map a FIFO or a device
        return np.memmap(path, dtype=dtype, mode="r")

    def _locate(self, index: int, start: int, stop: int) -> tuple[int, int, int]:
        shard = int(np.searchsorted(self._first_doc, index, side="right")) - 1
        base = int(self._offsets[shard][index - self._first_doc[shard]])
        return shard, base + start, base + stop

    def _slice(self, index: int, start: int, stop: int) -> np.ndarray:
        shard, first, last = self._locate(index, start, stop)
        return self._tokens[shard][first:last]

    def read_mask(self, index: int, start: int, stop: int) -> np.ndarray:
        if not self.has_loss_mask:
            return super().read_mask(index, start, stop)
        shard, first, last = self._locate(index, start, stop)
        return self._masks[shard][first:last].astype(np.float32)

    def _describe(self) -> str:
        return f"'{self.directory}' ({self.split})"

    def fingerprint(self) -> str:
        return self._fingerprint
