"""AdamW as an optax GradientTransformation, with compressed states, and its masks.

`adamw(state_format="fp32")` is optax's own AdamW (bit for bit); bf16, int8, fp8 and
int4 build a `CompressedAdamW` (compressed.py) behind the same signature, usable in any
optax chain. `apply_updates` is the one call the train step makes: it lets a
compressed AdamW write the new parameters in the same pass as the state (the fused
kernel's point) and is `update` + `optax.apply_updates` for anything else.

Masks from logical axis names (the trainer's): `decay_mask` decays weight matrices
only: a parameter is decayed when it has at least two axes besides the stacked
`layers` axis, so norms and biases (stacked or not) are not. `quantize_mask` selects
the leaves whose states may be compressed: the same matrices, and the embedding tables
(any leaf with a `vocab` axis) only if `embeddings` (bitsandbytes' StableEmbedding keeps
those in fp32; we quantize them by default, rows being blocks, to reach the memory
targets). Eligible leaves smaller than `min_quantized_size` stay fp32.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from efficient_train.optim.choices import OPTIMIZER_KERNELS
from efficient_train.optim.compressed import CompressedAdamW
from efficient_train.optim.quant import check_block_size, check_state_format
from efficient_train.parallel.sharding import LAYER_AXIS, logical_axes


def adamw(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    state_format: str = "fp32",
    block_size: int = 256,
    min_quantized_size: int = 4096,
    mask: Any | Callable[[Any], Any] | None = None,
    quantize_mask: Any | Callable[[Any], Any] | None = None,
    eps_root: float = 0.0,
    kernel: str = "auto",
    shardings: Any = None,
) -> optax.GradientTransformation:
    """AdamW with moments stored in `state_format` ('fp32', 'bf16', 'int8', 'fp8', 'int4').

    mask: weight-decay mask (as optax.adamw). quantize_mask: leaves whose moments may be
    compressed (default: leaves with at least two axes). block_size: elements per
    quantization block along the last axis (halved down to 32 where it does not
    divide). kernel: 'xla', 'pallas' (the fused kernel; interpreted on CPU) or 'auto'
    (pallas on GPU/TPU). shardings: NamedShardings of the state (shaped like the
    params), so the kernel runs per device; the XLA path needs none.
    """
    check_state_format(state_format)
    check_block_size(block_size)
    if kernel not in OPTIMIZER_KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not available; choose one of {', '.join(map(repr, OPTIMIZER_KERNELS))}")
    if state_format == "fp32":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask)
    impl = CompressedAdamW(
        learning_rate, b1, b2, eps, eps_root, weight_decay, state_format, block_size, min_quantized_size,
        mask, quantize_mask, kernel, shardings,
    )
    return optax.GradientTransformation(impl.init, impl.update)


def apply_updates(optimizer: optax.GradientTransformation, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    """(new params, new state): fused for a compressed `adamw`, else update + apply."""
    owner = getattr(optimizer.update, "__self__", None)
    if isinstance(owner, CompressedAdamW):
        return owner.apply(grads, state, params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _axis_mask(abstract_params: nnx.State, keep: Callable[[tuple[str | None, ...] | None, int], bool]) -> dict:
    def flag(variable: nnx.Variable) -> bool:
        return keep(logical_axes(variable), len(variable.get_value().shape))

    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(flag(v)), abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _is_matrix(names: tuple[str | None, ...] | None, ndim: int) -> bool:
    if names is None:
        return ndim >= 2
    return sum(1 for name in names if name != LAYER_AXIS) >= 2


def decay_mask(abstract_params: nnx.State) -> dict:
    """Pure-dict tree of bools: True for weight matrices, False for norms and biases."""
    return _axis_mask(abstract_params, _is_matrix)


def quantize_mask(abstract_params: nnx.State, *, embeddings: bool = True) -> dict:
    """Pure-dict tree of bools: True where the moments may be compressed."""
    return _axis_mask(abstract_params, lambda names, ndim: _is_matrix(names, ndim) and (embeddings or "vocab" not in (names or ())))
