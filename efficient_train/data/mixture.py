"""A weighted mixture of prepared datasets, sampled per seeded block, resumable exactly.

`data.mixture = "dirA:0.7,dirB:0.3"` (parsed by `data.parse_mixture`; weights are
normalized to sum to 1). Global samples
are grouped into blocks of BLOCK samples. Each block gives source s exactly counts[s]
of its slots (the weights times BLOCK, rounded by largest remainder, so the realized
share of a whole block is within 1/BLOCK of the weight) and a seeded permutation of the
block decides which slots. Source s's own stream (its windows, shuffled per epoch as a
single-source loader does, with its own seed) then advances by one for each slot it gets.

So where any sample comes from is a function of (seed, weights, the block's number)
alone: sample k of a block b is slot r of b, owned by source s, which is that source's
sample consumed[s] + b * counts[s] + (rank of r among s's slots of b). The loader's state
is the step plus, per source, how many samples it had given when the current weights
took effect (`start`, `consumed`): O(number of sources), in the checkpoint, and resume
is exact.

Weights may change on resume: the restored state's weights govern the samples before
the resumed step, and the new weights every sample from it on; `consumed` carries each
source's position across the change, so no source repeats or skips samples. The
realized share of each source over all samples so far is in every log record
(`mixture/<name>`).
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from efficient_train.data.batch import Batch
from efficient_train.data.errors import DataError
from efficient_train.data.loader import DataLoader, LoaderState, sample_windows
from efficient_train.data.packing import PackedWindows
from efficient_train.data.sources import TokenSource

BLOCK = 4096
_MIX_DOMAIN = 0x313C  # separates the block permutations' keys from the shuffles'


def block_counts(weights: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Slots per source in a block: weights x block rounded by largest remainder (they sum to block)."""
    exact = weights / weights.sum() * block
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]] += 1
    return counts


def _names(paths: list[str]) -> list[str]:
    base = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [b if base.count(b) == 1 else p for b, p in zip(base, paths)]


@dataclass(frozen=True)
class _Segment:
    """The samples from `start` on, drawn under `weights`; `consumed[s]`: source s's samples before."""

    start: int
    consumed: np.ndarray
    weights: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return block_counts(self.weights)


class MixtureLoader(DataLoader):
    """A DataLoader over several sources mixed by weight; same iteration, state and restore."""

    def __init__(
        self,
        sources: Sequence[TokenSource],
        paths: list[str],
        weights: list[float],
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        column_order: np.ndarray | None = None,
    ) -> None:
        self._setup(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                    process_count=process_count, shuffle=shuffle, column_order=column_order)
        self._sources = [PackedWindows(source, seq_len) for source in sources]
        self.names = _names(paths)
        digest = hashlib.sha256("\n".join(s.fingerprint() for s in sources).encode()).hexdigest()[:16]
        self._fingerprint = f"mixture-v1:{digest}"
        total = np.asarray(weights, dtype=np.float64)
        self._segment = _Segment(0, np.zeros(len(sources), dtype=np.int64), total / total.sum())
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def weights(self) -> np.ndarray:
        return self._segment.weights

    def _block(self, segment: _Segment, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(owner source, rank among that source's slots) of every slot of one block."""
        key = (segment.start, block)
        if key not in self._blocks:
            counts = segment.counts
            rng = np.random.default_rng([self.seed, _MIX_DOMAIN, segment.start, block])
            owner = np.repeat(np.arange(len(counts)), counts)[rng.permutation(BLOCK)]
            order = np.argsort(owner, kind="stable")
            rank = np.empty(BLOCK, dtype=np.int64)
            rank[order] = np.arange(BLOCK) - np.repeat(np.cumsum(counts) - counts, counts)
            if len(self._blocks) > 8:
                self._blocks.clear()
            self._blocks[key] = (owner, rank)
        return self._blocks[key]

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source's stream) of each global sample."""
        segment = self._segment
        relative = np.asarray(samples, dtype=np.int64) - segment.start
        if relative.size and relative.min() < 0:
            raise DataError(f"data.mixture: sample {int(samples.min())} precedes the current weights' first "
                            f"sample {segment.start}")
        blocks, slots = np.divmod(relative, BLOCK)
        source = np.empty_like(relative)
        index = np.empty_like(relative)
        for block in np.unique(blocks).tolist():
            where = blocks == block
            owner, rank = self._block(segment, block)
            source[where] = owner[slots[where]]
            index[where] = segment.consumed[source[where]] + block * segment.counts[source[where]] + rank[slots[where]]
        return source, index

    def consumed_before(self, sample: int, segment: _Segment | None = None) -> np.ndarray:
        """How many of the global samples [0, sample) each source gave."""
        segment = segment or self._segment
        block, slot = divmod(sample - segment.start, BLOCK)
        owner, _ = self._block(segment, block)
        return segment.consumed + block * segment.counts + np.bincount(owner[:slot], minlength=len(segment.counts))

    def _rows(self, samples: np.ndarray) -> Batch:
        source, index = self.locate(samples)
        parts: dict[int, Batch] = {}
        for s in np.unique(source).tolist():
            windows = self._sources[s]
            parts[s] = windows.rows(sample_windows(index[source == s], len(windows), self.seed << 16 | s, self.shuffle))
        fields: dict[str, np.ndarray] = {}
        for name, example in next(iter(parts.values())).fields().items():
            out = np.empty((len(samples),) + example.shape[1:], dtype=example.dtype)
            for s, part in parts.items():
                out[source == s] = getattr(part, name)
            fields[name] = out
        return Batch(**fields)

    def metrics(self) -> dict[str, float]:
        consumed = self.consumed_before(self.step * self.global_batch_size)
        total = int(consumed.sum())
        return {} if total == 0 else {f"mixture/{n}": float(c) / total for n, c in zip(self.names, consumed)}

    def state(self) -> LoaderState:
        mixture = {"block": BLOCK, "start": self._segment.start, "consumed": self._segment.consumed.tolist(),
                   "weights": self._segment.weights.tolist()}
        return LoaderState(step=self.step, seed=self.seed, fingerprint=self._fingerprint, seq_len=self.seq_len,
                           global_batch_size=self.global_batch_size, shuffle=self.shuffle, mixture=mixture)

    def restore(self, state: LoaderState) -> None:
        """Continue from `state`; with other weights than the checkpoint's, they apply from its step on."""
        super().restore(state)
        saved = self._saved_segment(state.mixture, state.step)
        if np.array_equal(saved.weights, self._segment.weights):
            self._segment = saved
            return
        boundary = state.step * self.global_batch_size
        self._segment = _Segment(boundary, self.consumed_before(boundary, saved), self._segment.weights)

    def _saved_segment(self, mixture: dict[str, Any] | None, step: int) -> _Segment:
        sources = len(self._sources)
        if not isinstance(mixture, dict) or set(mixture) != {"block", "start", "consumed", "weights"}:
            raise DataError(f"data loader state mixture: checkpoint has {mixture!r}, expected block, start, "
                            "consumed, weights")
        if mixture["block"] != BLOCK:
            raise DataError(f"data loader state mixture block: checkpoint has {mixture['block']!r}, this "
                            f"efficient-train samples blocks of {BLOCK}")
        start, consumed, weights = mixture["start"], mixture["consumed"], mixture["weights"]
        ok = (type(start) is int and 0 <= start <= step * self.global_batch_size
              and isinstance(consumed, list) and len(consumed) == sources
              and all(type(c) is int and c >= 0 for c in consumed)
              and isinstance(weights, list) and len(weights) == sources
              and all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
              and sum(weights) > 0)
        if not ok:
            raise DataError(f"data loader state mixture: checkpoint has start={start!r}, consumed={consumed!r}, "
                            f"weights={weights!r}; expected {sources} sources and a start at or before the step")
        return _Segment(start, np.asarray(consumed, dtype=np.int64), np.asarray(weights, dtype=np.float64))
