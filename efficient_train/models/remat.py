"""Rematerialization policies: which activations of a layer the backward keeps, and where.

`model.remat` names one of `choices.REMAT_POLICIES`. A policy decides, for each value a
layer computes, whether the backward pass reads it from memory or recomputes it from
the layer's input (which every policy but `none` keeps). The layers name the values a
policy can select with `jax.ad_checkpoint.checkpoint_name` (the `*_NAME` constants
below), so a policy is a list of names rather than a guess about primitives.

Per token and layer, in elements (e hidden, h heads, kv kv-heads, d head_dim, m MLP
width), besides the layer input that all remat policies keep:

| policy | keeps | elements |
|---|---|---|
| `none` | everything the backward reads (no remat) | most |
| `save_dots` | every matmul output without batch dims: q, k, v, o, gate, up, down | (h + 2kv) d + 2e + 2m |
| `save_attention` | q, k, v projections, attention's output, o projection | (h + 2kv) d + h d + e |
| `save_qkv` | q, k, v projections | (h + 2kv) d |
| `full` | nothing | 0 |

The MLP is recomputed under `save_attention` and `save_qkv`; attention's own softmax
statistics are never a named value, so every policy but `none` reruns the attention
forward inside the backward (as MaxText's named policies do).

`offload_dots`, `offload_attention`, `offload_qkv` keep the same values as their `save_*`
twin but move them to pinned host memory after the forward and back for the backward
(`jax.checkpoint_policies.save_and_offload_only_these_names`, device -> pinned_host):
device memory as with `full`, no recomputation of the projections, at the price of
PCIe traffic (MEMO's trade). Only the GPU and TPU compilers place buffers in host
memory; the CPU backend lowers the transfers as no-ops, so on a CPU an offload policy
computes exactly what its `save_*` twin computes.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import jax

from efficient_train.models.choices import REMAT_POLICIES

Q_NAME, K_NAME, V_NAME = "q_proj", "k_proj", "v_proj"
ATTENTION_NAME = "attention"  # attention's output, before the o projection
O_NAME = "o_proj"
GATE_NAME, UP_NAME, DOWN_NAME = "mlp_gate", "mlp_up", "mlp_down"

QKV = (Q_NAME, K_NAME, V_NAME)
ATTENTION_VALUES = QKV + (ATTENTION_NAME, O_NAME)
PROJECTIONS = QKV + (O_NAME, GATE_NAME, UP_NAME, DOWN_NAME)

# The named values each selective policy keeps (save_dots selects by primitive instead).
SAVED_NAMES = {"save_attention": ATTENTION_VALUES, "save_qkv": QKV}
OFFLOADED_NAMES = {"offload_dots": PROJECTIONS, "offload_attention": ATTENTION_VALUES, "offload_qkv": QKV}

DESCRIPTIONS = {
    "none": "no remat: every activation kept",
    "save_dots": "q, k, v, o, gate, up, down kept; attention recomputed",
    "save_attention": "q, k, v, attention output, o kept; MLP recomputed",
    "save_qkv": "q, k, v kept; the rest recomputed",
    "full": "layer inputs only; the whole layer recomputed",
    "offload_dots": "as save_dots, kept in pinned host memory",
    "offload_attention": "as save_attention, kept in pinned host memory",
    "offload_qkv": "as save_qkv, kept in pinned host memory",
}
assert tuple(DESCRIPTIONS) == REMAT_POLICIES


def _offload_policy(names: tuple[str, ...]) -> Callable:
    make = jax.checkpoint_policies.save_and_offload_only_these_names
    kwargs = {"names_which_can_be_offloaded": list(names), "offload_src": "device", "offload_dst": "pinned_host"}
    if "names_which_can_be_saved" in inspect.signature(make).parameters:  # jax 0.10 requires it; later ones dropped it
        kwargs["names_which_can_be_saved"] = []
    return make(**kwargs)


def checkpoint_policy(policy: str) -> Callable | None:
    """The `jax.checkpoint` policy of a remat policy name other than `none` (None = save nothing)."""
    if policy == "full":
        return None
    if policy == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if policy in SAVED_NAMES:
        return jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES[policy])
    if policy in OFFLOADED_NAMES:
        return _offload_policy(OFFLOADED_NAMES[policy])
    raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {policy!r}")


def remat(fn: Callable, policy: str, prevent_cse: bool) -> Callable:
    """`fn` (one layer) under the named policy; `fn` itself for `none`."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=checkpoint_policy(policy), prevent_cse=prevent_cse)
