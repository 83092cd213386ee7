"""Token layouts of a sequence split over the `sequence` mesh axis.

The batch's sequence dimension is sharded contiguously over the axis: device i holds
columns [i * T / S, (i + 1) * T / S) of whatever order the columns are in. Which
order that is, is the layout:

- `contiguous` (all_gather, ulysses): token order; device i holds chunk i of S.
- `zigzag` (ring): the sequence is cut into 2S chunks and device i holds chunks i and
  2S-1-i. Under a causal mask chunk c attends c whole chunks and half of its own, so
  every device gets the same work (i + 1/2 + 2S-1-i + 1/2 = 2S chunk pairs), where the
  contiguous layout would give the last device 2S-1 times the first's.

The zigzag reorder is applied once, to the host batch in the data pipeline
(`DataLoader(column_order=...)`), to every field alike (inputs, targets, positions,
segment ids, loss weights), and never undone: every op of the model but attention is
per token, the loss is a sum over tokens, and attention knows the layout. Only
numpy here, so the data package can use it without jax.
"""
from __future__ import annotations

import numpy as np

CONTIGUOUS = "contiguous"
ZIGZAG = "zigzag"

_LAYOUT_OF_MODE = {"all_gather": CONTIGUOUS, "ulysses": CONTIGUOUS, "ring": ZIGZAG}


def layout_of(mode: str) -> str:
    """The layout a sequence-parallel mode expects its batches in."""
    if mode not in _LAYOUT_OF_MODE:
        raise ValueError(f"sequence_parallel.mode: {mode!r} is not one of {', '.join(map(repr, _LAYOUT_OF_MODE))}")
    return _LAYOUT_OF_MODE[mode]


def zigzag_order(seq_len: int, size: int) -> np.ndarray:
    """Column permutation: new column j holds old column order[j] (device i: chunks i, 2S-1-i)."""
    if size < 1 or seq_len % (2 * size):
        raise ValueError(
            f"data.seq_len: {seq_len} must be divisible by 2 x mesh.sequence = {2 * size} for the zigzag layout"
        )
    chunks = np.arange(seq_len).reshape(2 * size, seq_len // (2 * size))
    pairs = [(i, 2 * size - 1 - i) for i in range(size)]
    return np.concatenate([chunks[c] for pair in pairs for c in pair])


def column_order(mode: str, seq_len: int, size: int) -> np.ndarray | None:
    """The reorder the data pipeline applies for `mode` on `size` devices; None: keep token order."""
    if size == 1 or layout_of(mode) == CONTIGUOUS:
        return None
    return zigzag_order(seq_len, size)
