"""efficient-train: distributed LLM training on JAX.

`from efficient_train import Trainer, get_config` is the Python API; the
`efficient-train` command wraps the same pieces.

The names below are imported on first use (PEP 562), not with the package: the
trainer pulls in the model, the kernels and flax, about a second of imports that the
checkpoint tools, `efficient-train --help` and a plain `import efficient_train.config`
do not need.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "ConfigError": "efficient_train.config", "get_config": "efficient_train.config", "validate": "efficient_train.config",
    "Hook": "efficient_train.train", "Trainer": "efficient_train.train", "TrainState": "efficient_train.train",
    "next_token_loss": "efficient_train.train",
}
__all__ = ["ConfigError", "Hook", "TrainState", "Trainer", "get_config", "next_token_loss", "validate"]

if TYPE_CHECKING:
    from efficient_train.config import ConfigError, get_config, validate
    from efficient_train.train import Hook, Trainer, TrainState, next_token_loss


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'efficient_train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
