"""Sampling from a model: batched decoding with a KV cache (decode.py), sampling rules
(sampling.py), text prompts through the data package's tokenizers (text.py).

`generate(model, prompts, ...)` works on token ids, `complete(model, texts, ...)` on text;
the `efficient-train generate` command loads a checkpoint (tools/checkpoint_model.py) and
calls `complete`. The names below are imported on first use (efficient_train/lazy.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_train.lazy import lazy_attributes

__all__ = ["SamplingOptions", "complete", "generate"]
__getattr__, __dir__ = lazy_attributes(__name__, {
    "SamplingOptions": "efficient_train.generate.sampling",
    "complete": "efficient_train.generate.text",
    "generate": "efficient_train.generate.decode",
})

if TYPE_CHECKING:
    from efficient_train.generate.decode import generate
    from efficient_train.generate.sampling import SamplingOptions
    from efficient_train.generate.text import complete
