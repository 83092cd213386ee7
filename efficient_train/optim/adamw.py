"""AdamW as an optax GradientTransformation, with decoupled weight decay under a mask.

`state_format="fp32"` is optax's own AdamW (bit for bit); compressed formats are
added by the optimizer-state work and keep this signature. The default decay mask
decays weight matrices only: a parameter is decayed when it has at least two axes
besides the stacked `layers` axis, so norms and biases (stacked or not) are not.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import nnx

from efficient_train.config import STATE_FORMATS
from efficient_train.sharding import LAYER_AXIS, logical_axes


def adamw(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    state_format: str = "fp32",
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    if state_format not in STATE_FORMATS:
        raise ValueError(f"state_format: {state_format!r} is not available; choose one of {', '.join(map(repr, STATE_FORMATS))}")
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


def decay_mask(abstract_params: nnx.State) -> dict:
    """Pure-dict tree of bools: True for weight matrices, False for norms and biases."""

    def decays(variable: nnx.Variable) -> bool:
        names = logical_axes(variable)
        ndim = len(variable.get_value().shape)
        if names is None:
            return ndim >= 2
        return sum(1 for name in names if name != LAYER_AXIS) >= 2

    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(decays(v)), abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
