"""The batch type every data source produces and every train step consumes.

A packed batch is a struct of equally shaped [batch, seq_len] arrays. Keeping the
five fields together (rather than a dict) lets the trainer give each one the same
sharding and lets the sequence-parallel layouts reorder all of them at once
(`take_columns`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct


@flax.struct.dataclass
class Batch:
    """One packed batch of [batch, seq_len] arrays (numpy on the host, jax on device).

    A jax pytree, so a step can take it as an argument.

    inputs:       int32 token ids fed to the model.
    targets:      int32 next-token ids to predict.
    positions:    int32 position of each input token inside its own document
                  (restarts at 0 at every document start; rotary embeddings use it).
    segment_ids:  int32 document id inside the row, 1, 2, ...; 0 marks padding.
                  Attention never crosses segments.
    loss_weights: float32, 1 where the target belongs to the same document as the
                  input, 0 at document ends and padding.
    """

    inputs: Any
    targets: Any
    positions: Any
    segment_ids: Any
    loss_weights: Any

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def take_columns(self, order: Any) -> Batch:
        """The same tokens with the sequence dimension reordered: column j holds column order[j].

        Sequence-parallel layouts (`parallel.layout`, e.g. ring attention's zigzag) use it.
        """
        return Batch(**{name: value[:, order] for name, value in self.fields().items()})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.inputs.shape)
