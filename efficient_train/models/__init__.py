"""Model families in Flax NNX and the attention dispatch they call.

`choices` (allowed remat/attention/norm/dtype names) and `config` (`ModelConfig`) load
no jax, so `config.validate` can use them; the names below are imported on first use
(efficient_train/lazy.py). The attention dispatch is `models.attention.attention`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_train.lazy import lazy_attributes

__all__ = ["Llama", "ModelConfig"]
__getattr__, __dir__ = lazy_attributes(__name__, {
    "ModelConfig": "efficient_train.models.llama.config",
    "Llama": "efficient_train.models.llama.model",
})

if TYPE_CHECKING:
    from efficient_train.models.llama.config import ModelConfig
    from efficient_train.models.llama.model import Llama
