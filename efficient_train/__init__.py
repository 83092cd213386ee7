"""efficient-train: distributed LLM training on JAX.

`from efficient_train import Trainer, get_config` is the Python API; the
`efficient-train` command wraps the same pieces. The names are imported on first use
(lazy.py): the trainer's imports take about a second that the checkpoint tools and a
plain `import efficient_train.config` do not need.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_train.lazy import lazy_attributes

__all__ = ["ConfigError", "Hook", "TrainState", "Trainer", "get_config", "next_token_loss", "validate"]
__getattr__, __dir__ = lazy_attributes(__name__, {
    **dict.fromkeys(["ConfigError", "get_config", "validate"], "efficient_train.config"),
    **dict.fromkeys(["Hook", "Trainer", "TrainState", "next_token_loss"], "efficient_train.train"),
})

if TYPE_CHECKING:
    from efficient_train.config import ConfigError, get_config, validate
    from efficient_train.train import Hook, Trainer, TrainState, next_token_loss
