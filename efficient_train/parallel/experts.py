"""Expert parallelism: tokens travel to the devices that hold their experts, and back, by all-to-all.

Experts are sharded over the `expert` mesh axis (G devices, E / G experts each); every
other computation treats that axis as one more batch axis, so each device routes its
own tokens. While the train step is traced inside its `shard_map` (manual over the
expert axis) it opens `exchanging(axis, size)`, and an MoE layer asks `current()`.

Two exchanges, both with fixed shapes so they compile to one `all-to-all` each way:
- `capacity_exchange` (capacity-factor mode, GShard's shape): the [E, C, H] dispatch
  buffer is split by expert over the axis; each device receives [E / G, G x C, H], the
  rows every device sent to its own experts, computes them, and sends them back.
- `dropless_exchange`: assignments sorted by expert are laid into a [G, R, H] buffer, one
  block per destination device of R = tokens x min(k, E / G) rows (the worst case: a token's
  k experts are distinct, so at most min(k, E / G) of them live on one device), so no
  assignment is ever dropped; the receiver sorts the rows
  by its local expert and runs the grouped matmul, whose rows past the real ones are
  zeros. The buffer is up to G times the assignments: exact and simple at the price of memory
  and bytes on the wire (a ragged all-to-all would send only the real rows; see
  BENCHMARKS.md for the bytes).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager

import jax
import jax.numpy as jnp

from efficient_train.parallel.context import TracingContext

EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class ExpertAxis:
    """The manual mesh axis experts are sharded over and its size."""

    name: str
    size: int


_EXCHANGE: TracingContext[ExpertAxis] = TracingContext("expert exchange")


def exchanging(axis: str, size: int) -> AbstractContextManager[None]:
    """Within this context (tracing inside a shard_map manual over `axis`), MoE layers exchange tokens."""
    return _EXCHANGE.holding(ExpertAxis(axis, size))


def current() -> ExpertAxis | None:
    return _EXCHANGE.current()


# (rows [M, H] sorted by local expert, group sizes [local experts]) -> [M, H]; rows past the groups give 0.
GroupedFn = Callable[[jax.Array, jax.Array], jax.Array]


def peer_rows(tokens: int, experts_per_token: int, local_experts: int) -> int:
    """The most assignments one device can send one peer: each token picks distinct experts, so at
    most min(k, experts per device) of its k land on one device."""
    return tokens * min(experts_per_token, local_experts)


def dropless_exchange(rows: jax.Array, experts: jax.Array, num_experts: int, experts_per_token: int,
                      axis: ExpertAxis, compute: GroupedFn) -> jax.Array:
    """Expert outputs of `rows` [A, H] (A = tokens x k), sorted by their global expert ids `experts` [A].

    Device g holds experts g x (E / G) ... (g + 1) x (E / G) - 1; `compute` runs this
    device's experts on rows grouped by local expert.
    """
    a, h = rows.shape
    g = axis.size
    local = num_experts // g
    per_peer = peer_rows(a // experts_per_token, experts_per_token, local)
    peer = experts // local  # non-decreasing, since `experts` is sorted
    peer_counts = jnp.bincount(peer, length=g)
    row = jnp.arange(a) - (jnp.cumsum(peer_counts) - peer_counts)[peer]
    send = jnp.zeros((g, per_peer, h), rows.dtype).at[peer, row].set(rows)
    send_ids = jnp.full((g, per_peer), local, jnp.int32).at[peer, row].set((experts % local).astype(jnp.int32))
    recv = jax.lax.all_to_all(send.reshape(g * per_peer, h), axis.name, 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids.reshape(g * per_peer), axis.name, 0, 0, tiled=True)
    order = jnp.argsort(recv_ids, stable=True)  # padding (id = local) last
    out = compute(recv[order], jnp.bincount(recv_ids, length=local))
    back = out[jnp.argsort(order)]
    returned = jax.lax.all_to_all(back, axis.name, 0, 0, tiled=True).reshape(g, per_peer, h)
    return returned[peer, row]


def capacity_exchange(buffer: jax.Array, axis: ExpertAxis, compute: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """[E, C, H] dispatch buffer -> [E, C, H] expert outputs, `compute` running [E / G, G x C, H] locally."""
    received = jax.lax.all_to_all(buffer, axis.name, 0, 1, tiled=True)
    return jax.lax.all_to_all(compute(received), axis.name, 1, 0, tiled=True)
