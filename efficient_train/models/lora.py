"""LoRA adapters: low-rank trainable updates beside frozen base weights.

A targeted projection computes `W x + scale * B(A(dropout(x)))` with `scale = alpha / rank`
(PEFT's definition). The base kernel W keeps its layout (in..., out...); A has the
kernel's input dims and a trailing rank axis, B a leading rank axis and the kernel's
output dims, each with the kernel's logical names and `lora_rank` for the rank
(`parallel/sharding.LORA_RANK_AXIS`: replicated, never the ZeRO dimension), so A shards
like the kernel's input and B like its output under every ZeRO stage and tensor
parallelism. Stacked layers (scan) give A and B the same leading `layers` axis.

Decisions:
- Adapters are `LoRAParam`s, a subclass of `nnx.Param`: `nnx.split(model, LoRAParam,
  nnx.Param, ...)` separates what trains from the frozen base, and code that asks for
  `nnx.Param` still sees every weight.
- They are attached after the model is built (`add_adapters`), as `Linear.lora` /
  `Embed.lora`, so the layers only call a hook and know nothing else of LoRA; adapter
  weights are stored in fp32 whatever `param_dtype` is (they are the trained master
  weights; the base stays in `param_dtype`) and computed in the layer's dtype.
- Initialization as PEFT: A uniform in +-1/sqrt(fan_in) (kaiming-uniform with a=sqrt(5)),
  B zero, so the adapted model starts equal to the base. For the embedding PEFT swaps
  them: A (vocab, rank) zero, B (rank, hidden) standard normal; and no dropout.
- Dropout on the adapter's input happens only while the train step holds a key
  (`dropout_key`); the model folds in the layer index (`layer_dropout`), each adapter its
  target's index, so every layer and projection draws its own mask, and the backward's
  recomputation (remat) draws the same one. Evaluation, decoding and export see none.
- `merge_delta` is the one formula for merging (checkpoint merge-lora, export-hf), on
  numpy or jax arrays: W + scale * A @ B with the input and output dims flattened.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_train.models.choices import LORA_LINEAR_TARGETS, LORA_TARGETS
from efficient_train.models.layers import Embed, Linear
from efficient_train.parallel.context import TracingContext
from efficient_train.parallel.sharding import LAYER_AXIS, LORA_RANK_AXIS

# Where each target sits inside a decoder block (the last two parts of the module's path).
TARGET_MODULES = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
                  "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}
ADAPTER_DTYPE = jnp.float32

_DROPOUT_KEY: TracingContext[jax.Array] = TracingContext("LoRA dropout key")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """`finetune.lora` of a run with adapters (rank > 0)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config_dict(cls, lora: Mapping[str, Any]) -> LoRAConfig | None:
        """The adapters of a validated `finetune.lora` section; None when rank is 0 (no LoRA)."""
        if not lora["rank"]:
            return None
        return cls(int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), parse_targets(lora["targets"]))

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores of it (metadata.json's `finetune.lora`)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


def parse_targets(text: str) -> tuple[str, ...]:
    """"q,v" -> ("q", "v") in `LORA_TARGETS` order (the names are checked by config.validate_fields)."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    return tuple(name for name in LORA_TARGETS if name in names)


class LoRAParam(nnx.Param):
    """A trained adapter weight (A or B); every other `nnx.Param` of a LoRA model is frozen."""


class LoRA(nnx.Module):
    """The adapter of one kernel (in..., out...) or embedding table (vocab, embed).

    `stack` is the kernel's leading stacked dims (the scanned `layers` axis) and `names`
    its logical axis names, stacked dims included; `n_in` how many of the rest are input dims.
    """

    def __init__(self, shape: tuple[int, ...], names: tuple[str, ...], n_in: int, stack: int, cfg: LoRAConfig,
                 *, salt: int, dtype: jnp.dtype, key: jax.Array, embedding: bool = False):
        lead, in_shape, out_shape = shape[:stack], shape[stack:stack + n_in], shape[stack + n_in:]
        lead_names, in_names, out_names = names[:stack], names[stack:stack + n_in], names[stack + n_in:]
        a_shape, b_shape = (*lead, *in_shape, cfg.rank), (*lead, cfg.rank, *out_shape)
        if embedding:  # PEFT: A zero, B standard normal
            a = jnp.zeros(a_shape, ADAPTER_DTYPE)
            b = jax.random.normal(key, b_shape, ADAPTER_DTYPE)
        else:  # PEFT: kaiming-uniform(a=sqrt(5)) A, i.e. +-1/sqrt(fan_in); B zero
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            a = jax.random.uniform(key, a_shape, ADAPTER_DTYPE, -bound, bound)
            b = jnp.zeros(b_shape, ADAPTER_DTYPE)
        self.a = LoRAParam(a, out_sharding=(*lead_names, *in_names, LORA_RANK_AXIS))
        self.b = LoRAParam(b, out_sharding=(*lead_names, LORA_RANK_AXIS, *out_names))
        self.n_in = n_in
        self.scale = cfg.scale
        self.dropout = 0.0 if embedding else cfg.dropout
        self.salt = salt
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """scale * B(A(dropout(x))) for x [..., *in] -> [..., *out], in the compute dtype."""
        x = self._dropout(x.astype(self.dtype))
        a, b = self.a.get_value().astype(self.dtype), self.b.get_value().astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        h = jax.lax.dot_general(x, a, (contract, ((), ())), preferred_element_type=self.dtype)
        h = h * jnp.asarray(self.scale, self.dtype)
        return jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=self.dtype)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """The embedding adapter: scale * A[ids] @ B, [..., embed]."""
        rows = jnp.take(self.a.get_value(), ids, axis=0).astype(self.dtype) * jnp.asarray(self.scale, self.dtype)
        return jnp.einsum("...r,re->...e", rows, self.b.get_value().astype(self.dtype),
                          preferred_element_type=self.dtype)

    def _dropout(self, x: jax.Array) -> jax.Array:
        key = _DROPOUT_KEY.current()
        if key is None or not self.dropout:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt), 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))


def _stack_dims(names: tuple[str, ...]) -> int:
    return 1 if names and names[0] == LAYER_AXIS else 0


def add_adapters(model: nnx.Module, cfg: LoRAConfig, key: jax.Array) -> nnx.Module:
    """Attach an adapter to every targeted projection (and the embedding) of `model`; returns it.

    Targets are found by module path: `.../attn/q` is q, `.../mlp/down` is down, the
    top-level `embed` is the embedding. A target the model lacks is an error.
    """
    found: set[str] = set()
    wanted: dict[tuple[str, ...], str] = {TARGET_MODULES[t]: t for t in cfg.targets if t in LORA_LINEAR_TARGETS}
    for path, node in list(nnx.iter_graph(model)):
        target = wanted.get(tuple(str(part) for part in path[-2:])) if isinstance(node, Linear) else (
            "embed" if isinstance(node, Embed) and tuple(path) == ("embed",) and "embed" in cfg.targets else None)
        if target is None:
            continue
        variable = node.kernel if isinstance(node, Linear) else node.embedding
        names = tuple(variable.get_metadata()["out_sharding"])
        value = variable.get_value()
        salt = LORA_TARGETS.index(target)
        node.lora = LoRA(tuple(value.shape), names, node.n_in if isinstance(node, Linear) else 1,
                         _stack_dims(names), cfg, salt=salt, dtype=node.dtype,
                         key=jax.random.fold_in(key, len(found)), embedding=target == "embed")
        found.add(target)
    missing = [t for t in cfg.targets if t not in found]
    if missing:
        raise ValueError(f"finetune.lora.targets: this model has no {', '.join(missing)} to adapt")
    return model


def dropout_key(key: jax.Array) -> AbstractContextManager[None]:
    """While tracing the train step: adapters drop their inputs, with masks drawn from `key`."""
    return _DROPOUT_KEY.holding(key)


def layer_dropout(layer: jax.Array | int) -> AbstractContextManager[None]:
    """Inside one decoder layer: the dropout key folded with the layer's index (no-op outside training)."""
    key = _DROPOUT_KEY.current()
    return nullcontext() if key is None else _DROPOUT_KEY.holding(jax.random.fold_in(key, layer))


def merge_delta(kernel: Any, a: Any, b: Any, scale: float) -> Any:
    """kernel + scale * A @ B in fp32, cast back to the kernel's dtype (numpy or jax arrays).

    kernel (stack..., in..., out...), a (stack..., in..., r), b (stack..., r, out...).
    """
    xp = jnp if isinstance(kernel, jax.Array) else np
    stack = a.ndim + b.ndim - kernel.ndim - 2
    lead = kernel.shape[:stack]
    rank = a.shape[-1]
    a2 = xp.asarray(a, xp.float32).reshape(*lead, -1, rank)
    b2 = xp.asarray(b, xp.float32).reshape(*lead, rank, -1)
    delta = (a2 @ b2).reshape(kernel.shape)
    return (xp.asarray(kernel, xp.float32) + np.float32(scale) * delta).astype(kernel.dtype)
