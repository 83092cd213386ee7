"""Package attributes imported on first use (PEP 562).

The packages whose public names live in heavy modules (the trainer: flax, the model,
the kernels; checkpoints: jax and Orbax) export them through this, so that importing a
light sibling (`efficient_train.config`, `efficient_train.checkpoint.metadata`) or
running `efficient-train --help` does not pay a second of imports it never uses.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose attribute `name` lives in module `homes[name]`."""
    namespace = vars(sys.modules[package])

    def attribute(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def names() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return attribute, names
