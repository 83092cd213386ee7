"""The Llama family: `ModelConfig` (config.py), the decoder `Llama` (model.py), and its Hugging Face tensor names (hf_names.py).

A second family is a sibling folder with the same three parts; the building blocks
they share (`models/layers.py`, the attention dispatch `models/attention.py`, the
allowed names `models/choices.py`) sit one level up. `Llama` is imported on first use
(efficient_train/lazy.py), so `ModelConfig` loads without jax.
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
