"""Packing: documents -> fixed-length rows with segment ids, positions and loss weights.

GPT-style packing: all documents, in order, form one token stream, and window i is the
stream slice [i * seq_len, i * seq_len + seq_len + 1). A window overlaps its neighbour by
one token so that inputs = window[:-1] and targets = window[1:] use every token as a
target exactly once. No padding and no token is dropped except the stream's tail that
does not fill a whole window, so segment id 0 (padding) never appears here.

Per row (all int32, loss_weights float32):
- segment_ids number the documents inside the row 1, 2, ... (renumbered per row);
- positions count from a document's first token, across windows: a document continued
  from the previous window keeps counting (rotary embeddings see true offsets);
- loss_weights are 1 where the target is the next token of the same document, 0 where
  the input is its document's last token (the target would be another document's first);
  a source with a loss mask (`has_loss_mask`, chat data) also zeroes them where the
  target token is masked (a prompt token): the mask travels with the tokens through
  packing, as the third per-token array beside segment ids and positions, and the loss
  is (sum of weighted token losses, sum of weights).

Window i is computed from a precomputed document offset table alone (searchsorted), so
any window can be built at any time: the loader's random access and resume rest on it.
"""
from __future__ import annotations

import numpy as np

from efficient_train.data.batch import Batch
from efficient_train.data.errors import DataError
from efficient_train.data.sources import TokenSource


class PackedWindows:
    """Random access to the packed windows of a source; `rows(indices)` builds a Batch."""

    def __init__(self, source: TokenSource, seq_len: int) -> None:
        if seq_len < 1:
            raise DataError(f"data.seq_len: {seq_len} must be >= 1")
        self.source = source
        self.seq_len = seq_len
        self._doc_starts = np.concatenate([[0], np.cumsum(source.document_lengths())]).astype(np.int64)
        total = int(self._doc_starts[-1])
        if total < seq_len + 1:
            raise DataError(
                f"data.seq_len: the source {source._describe()} holds {total} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1} for one row"
            )
        self.num_tokens = total

    def __len__(self) -> int:
        """Number of whole windows: i * seq_len + seq_len + 1 <= num_tokens."""
        return (self.num_tokens - 1) // self.seq_len

    def rows(self, indices: np.ndarray) -> Batch:
        """The packed rows for window indices [n] as a Batch of [n, seq_len] numpy arrays."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window index outside [0, {len(self)})")
        length = self.seq_len + 1
        stream = indices[:, None] * self.seq_len + np.arange(length)  # [n, seq_len + 1]
        doc = np.searchsorted(self._doc_starts, stream, side="right") - 1
        within = stream - self._doc_starts[doc]

        tokens = np.empty(stream.shape, dtype=np.int32)
        masked = self.source.has_loss_mask
        mask = np.empty(stream.shape, dtype=np.float32) if masked else None
        for row, (first, last) in enumerate(zip(doc[:, 0].tolist(), doc[:, -1].tolist())):
            col = 0
            for d in range(first, last + 1):
                start = int(within[row, 0]) if d == first else 0
                if d == last:
                    stop = int(within[row, -1]) + 1
                else:
                    stop = int(self._doc_starts[d + 1] - self._doc_starts[d])
                tokens[row, col : col + stop - start] = self.source.read(d, start, stop)
                if mask is not None:
                    mask[row, col : col + stop - start] = self.source.read_mask(d, start, stop)
                col += stop - start

        loss_weights = (doc[:, 1:] == doc[:, :-1]).astype(np.float32)
        if mask is not None:
            loss_weights *= mask[:, 1:]  # a target that is not the assistant's (chat) teaches nothing
        return Batch(
            inputs=np.ascontiguousarray(tokens[:, :-1]),
            targets=np.ascontiguousarray(tokens[:, 1:]),
            positions=within[:, :-1].astype(np.int32),
            segment_ids=(doc[:, :-1] - doc[:, :1] + 1).astype(np.int32),
            loss_weights=loss_weights,
        )
