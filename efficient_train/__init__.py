"""efficient-train: distributed LLM training on JAX.

`from efficient_train import Trainer, get_config` is the Python API; the
`efficient-train` command wraps the same pieces.
"""
from efficient_train.config import ConfigError, get_config, validate
from efficient_train.train import Hook, Trainer, TrainState, next_token_loss

__all__ = ["ConfigError", "Hook", "TrainState", "Trainer", "get_config", "next_token_loss", "validate"]
