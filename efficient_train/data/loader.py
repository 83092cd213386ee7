"""The deterministic, per-process, resumable loader.

The whole data order is a pure function of (source, seq_len, global batch, seed, step):
global sample k (row k % B of global batch k // B) is packed window
perm_e(k mod W) of epoch e = k // W, where W is the number of windows and perm_e a seeded
permutation of [0, W). Hence
- any process computes just its own rows, rows [p*B/P, (p+1)*B/P) of each global batch,
  and P processes together see exactly what one process sees;
- the loader's state is one integer (the step) plus the identity of what it reads,
  small enough for the checkpoint's metadata, and resume is exact;
- epochs wrap around forever, each with a fresh permutation.

The permutation is a keyed Feistel network over the next power of four >= W with
cycle walking, evaluated per index: O(batch) work and O(1) memory whatever W is, so a
billion-window corpus costs no permutation table (the index-shuffle idea Grain also uses).
`column_order` reorders every row's columns, the same way in every field, after packing:
the sequence-parallel layout (ring attention's zigzag, `parallel.layout`) is applied
here, once. It changes no data order and is not part of the loader's state, so a run
may resume on another mesh or mode.

Grain itself is not used: this random-access model plus one integer of state is all the
trainer needs, and it keeps the package free of another dependency.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from efficient_train.data.batch import Batch
from efficient_train.data.errors import DataError
from efficient_train.data.packing import PackedWindows
from efficient_train.data.sources import TokenSource

_FEISTEL_ROUNDS = 4
_SHUFFLE_DOMAIN = 0x5EED  # separates the shuffle's keys from the sources' own seeds


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijective avalanche on uint64 (wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(indices: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """perm(indices) for a seeded pseudo-random permutation of [0, size), one per (seed, epoch)."""
    x = np.asarray(indices, dtype=np.uint64)
    if size <= 1:
        return x.astype(np.int64)
    half = max(1, (int(size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([seed, _SHUFFLE_DOMAIN, epoch]).integers(
        0, 2**63, size=_FEISTEL_ROUNDS, dtype=np.uint64
    )

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right + key) & mask)
        return (left << np.uint64(half)) | right

    y = encrypt(x)
    outside = y >= size
    while outside.any():  # cycle walking: re-encrypt until back inside [0, size)
        y[outside] = encrypt(y[outside])
        outside = y >= size
    return y.astype(np.int64)


def sample_windows(samples: np.ndarray, num_windows: int, seed: int, shuffle: bool) -> np.ndarray:
    """The window of each sample of a stream that visits all `num_windows` windows once per epoch,
    each epoch in a fresh seeded order (or in order without shuffle)."""
    epochs, offsets = np.divmod(samples, num_windows)
    if not shuffle:
        return offsets
    windows = np.empty_like(offsets)
    for epoch in np.unique(epochs).tolist():
        where = epochs == epoch
        windows[where] = feistel_permute(offsets[where], num_windows, seed, epoch)
    return windows


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """Everything needed to continue a loader's stream; JSON-serializable via to_dict().

    `mixture` is None for one source; a mixture's per-source position (mixture.py) otherwise.
    """

    step: int
    seed: int
    fingerprint: str
    seq_len: int
    global_batch_size: int
    shuffle: bool
    mixture: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.mixture is None:  # one source: the same record as before mixtures existed
            del out["mixture"]
        return out

    @classmethod
    def from_dict(cls, d: Any) -> LoaderState:
        """The state a checkpoint's metadata holds; DataError naming the key when it is malformed."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) not in (names, names - {"mixture"}):
            keys = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise DataError(f"data loader state: checkpoint holds {keys}, expected keys {sorted(names)}")
        for name, kind in (("step", int), ("seed", int), ("seq_len", int), ("global_batch_size", int),
                           ("fingerprint", str), ("shuffle", bool)):
            value = d[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise DataError(f"data loader state {name}: checkpoint has {value!r}, expected {kind.__name__}")
        if not isinstance(d.get("mixture", {}), (dict, type(None))):
            raise DataError(f"data loader state mixture: checkpoint has {d['mixture']!r}, expected an object")
        return cls(**d)


class DataLoader:
    """Iterator of this process's rows of each global batch, as a Batch of numpy arrays."""

    def __init__(
        self,
        source: TokenSource,
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
        self._windows = PackedWindows(source, seq_len)
        self._fingerprint = source.fingerprint()

    def _setup(self, *, seq_len: int, global_batch_size: int, seed: int, process_index: int, process_count: int,
               shuffle: bool, column_order: np.ndarray | None) -> None:
        """Check and keep what every loader has: the batch, this process's rows, seed, layout."""
        if global_batch_size < 1:
            raise DataError(f"global_batch_size: {global_batch_size} must be >= 1")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(
                f"process_index: {process_index} must lie in [0, process_count={process_count})"
            )
        if global_batch_size % process_count:
            raise DataError(
                f"global_batch_size: {global_batch_size} is not divisible by process_count {process_count}"
            )
        if seed < 0:
            raise DataError(f"seed: {seed} must be >= 0")
        if column_order is not None and sorted(np.asarray(column_order).tolist()) != list(range(seq_len)):
            raise DataError(f"column_order: must be a permutation of the {seq_len} columns of a row")
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.column_order = None if column_order is None else np.asarray(column_order)
        self.local_batch_size = global_batch_size // process_count
        self._first_row = process_index * self.local_batch_size
        self.step = 0

    @property
    def num_windows(self) -> int:
        """Packed rows per epoch."""
        return len(self._windows)

    @property
    def bytes_per_token(self) -> float | None:
        """The source's UTF-8 bytes per token where known (evaluation's bits per byte)."""
        return self._windows.source.bytes_per_token

    @property
    def batch_shape(self) -> tuple[int, int]:
        """Shape of every array of the batches this process gets."""
        return (self.local_batch_size, self.seq_len)

    def batch_at(self, step: int) -> Batch:
        """This process's rows of global batch `step` (does not move the iterator)."""
        samples = step * self.global_batch_size + self._first_row + np.arange(self.local_batch_size)
        rows = self._rows(samples)
        return rows if self.column_order is None else rows.take_columns(self.column_order)

    def _rows(self, samples: np.ndarray) -> Batch:
        """The packed rows of global samples `samples`."""
        return self._windows.rows(sample_windows(samples, self.num_windows, self.seed, self.shuffle))

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> Batch:
        # A DataError (a token file that shrank, a bad id) leaves the step where it was:
        # state() still describes the batches the run has trained on.
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def metrics(self) -> dict[str, float]:
        """What the data adds to a log step's record (a mixture: each source's realized share)."""
        return {}

    def state(self) -> LoaderState:
        return LoaderState(
            step=self.step,
            seed=self.seed,
            fingerprint=self._fingerprint,
            seq_len=self.seq_len,
            global_batch_size=self.global_batch_size,
            shuffle=self.shuffle,
        )

    def restore(self, state: LoaderState) -> None:
        """Continue from `state`; refuse one that describes a different stream."""
        mine = self.state()
        for field in ("fingerprint", "seq_len", "global_batch_size", "seed", "shuffle"):
            if getattr(state, field) != getattr(mine, field):
                raise DataError(
                    f"data loader state {field}: checkpoint has {getattr(state, field)!r}, this loader "
                    f"{getattr(mine, field)!r}; resume needs the same data, seq_len, batch, seed and shuffle"
                )
        if state.step < 0:
            raise DataError(f"data loader state step: {state.step} must be >= 0")
        self.step = state.step
