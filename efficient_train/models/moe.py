"""The Mixture-of-Experts feed-forward block: an fp32 router, top-k SwiGLU experts, shared experts.

`MoE(x)` returns the block's output and its router statistics. Decisions:
- Router in fp32 (its kernel is stored fp32 whatever param_dtype says): the top-k choice
  is discontinuous, so bf16 rounding would change which experts a token meets.
  'softmax_topk' (Mixtral, Qwen 3 MoE): softmax over all experts, top k, renormalized
  when norm_topk_prob. 'sigmoid_topk' (DeepSeek V3): sigmoid scores, top k, normalized.
  Both multiply by routed_scaling.
- Dropless by default: the token x k assignments are sorted by expert and the experts
  run as one grouped matmul (group sizes = tokens per expert), so nothing is dropped and
  the result does not depend on how tokens are batched. `moe.impl` picks it:
  `jax.lax.ragged_dot` ('auto', 'xla'), or the Pallas kernel ('pallas',
  pallas_kernels/grouped_matmul: XLA on GPUs expands ragged_dot densely over the groups).
  capacity_factor > 0 is the fixed-shape alternative (GShard): each expert takes at most
  C = ceil(factor x tokens x k / experts) assignments in token order, the rest are
  dropped (their output is 0; the residual carries the token) and counted.
- Under expert parallelism (`parallel.experts.current()` set by the train step) the
  expert weights seen here are this device's E / G experts and tokens travel by
  all-to-all (parallel/experts.py); the routing and the statistics stay local.
- Statistics, per layer: `load` (assignments per expert, no gradient), `prob_sum` (the
  router probabilities summed over tokens, differentiable: the balance loss is linear in
  it), `z_sum` (sum of logsumexp(logits)^2, differentiable), `tokens`, `dropped`. The
  model hands them to `record`; the train step collects them (`collecting`) and forms the
  balance loss from frequencies over the global batch (train/moe_balance.py).

Parameters: router ('embed', 'router': never sharded, every device routes its tokens), router_bias
('router',) with router_bias_update; experts.gate, experts.up ('experts', 'embed',
'expert_mlp'); experts.down ('experts', 'expert_mlp', 'embed'); shared experts are one
dense MLP of shared_experts x moe_intermediate_size built by the caller.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_train.models.llama.config import ModelConfig
from efficient_train.parallel import experts as expert_parallel
from efficient_train.parallel.context import TracingContext

Stats = dict[str, jax.Array]
STAT_NAMES = ("load", "prob_sum", "z_sum", "tokens", "dropped")

_SINK: TracingContext[list[Stats]] = TracingContext("MoE router statistics")


@contextlib.contextmanager
def collecting() -> Iterator[list[Stats]]:
    """Within this context the model's `record` calls append their (layer-stacked) statistics to the list."""
    sink: list[Stats] = []
    with _SINK.holding(sink):
        yield sink


def record(stats: Stats) -> None:
    """Hand one forward pass's statistics ([MoE layers, ...] each) to the open `collecting` context, if any."""
    sink = _SINK.current()
    if sink is not None:
        sink.append(stats)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in_axis: int, dtype: jnp.dtype) -> jax.Array:
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=fan_in_axis,
                                                batch_axis=(0,) if len(shape) == 3 else ())
    return init(rngs.params(), shape, dtype)


class Experts(nnx.Module):
    """num_experts SwiGLU experts as stacked kernels: gate/up [X, E, M], down [X, M, E]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        x, e, m = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        pdt = jnp.dtype(cfg.param_dtype)
        self.gate = nnx.Param(_init(rngs, (x, e, m), 1, pdt), out_sharding=("experts", "embed", "expert_mlp"))
        self.up = nnx.Param(_init(rngs, (x, e, m), 1, pdt), out_sharding=("experts", "embed", "expert_mlp"))
        self.down = nnx.Param(_init(rngs, (x, m, e), 1, pdt), out_sharding=("experts", "expert_mlp", "embed"))
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.moe_impl

    def _kernels(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(p.get_value().astype(self.dtype) for p in (self.gate, self.up, self.down))  # type: ignore[return-value]

    def grouped(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """rows [M, E] sorted by expert, group_sizes [X] -> [M, E]; rows past the groups give 0."""
        gate, up, down = self._kernels()
        rows = rows.astype(self.dtype)
        matmul = self._grouped_matmul
        hidden = jax.nn.silu(matmul(rows, gate, group_sizes)) * matmul(rows, up, group_sizes)
        return matmul(hidden, down, group_sizes)

    def _grouped_matmul(self, rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """One grouped matmul as `moe.impl` asks: jax.lax.ragged_dot, or the Pallas kernel (Triton,
        run by the interpreter on a CPU; never a silent fallback to ragged_dot)."""
        if self.impl != "pallas":
            return jax.lax.ragged_dot(rows, weights, group_sizes)
        from pallas_kernels.backends import default_interpret
        from pallas_kernels.grouped_matmul import grouped_matmul

        return grouped_matmul(rows, weights, group_sizes, backend="triton", interpret=default_interpret())

    def dense(self, buffer: jax.Array) -> jax.Array:
        """buffer [X, C, E] (each expert's rows) -> [X, C, E]."""
        gate, up, down = self._kernels()
        buffer = buffer.astype(self.dtype)
        hidden = jax.nn.silu(jnp.einsum("xce,xem->xcm", buffer, gate)) * jnp.einsum("xce,xem->xcm", buffer, up)
        return jnp.einsum("xcm,xme->xce", hidden, down)


def route(cfg: ModelConfig, logits: jax.Array, bias: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """fp32 logits [T, X] -> (weights [T, k], expert ids [T, k], probabilities [T, X] for the balance loss).
    `bias` [X] (auxiliary-loss-free balancing) shifts the scores for the choice of experts only;
    with router_groups, the choice is among the experts of each token's best groups only."""
    k = cfg.experts_per_token
    if cfg.router == "softmax_topk":
        probs = scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    if bias is None and not cfg.router_groups:
        weights, ids = jax.lax.top_k(scores, k)
    else:
        choice = scores if bias is None else scores + jax.lax.stop_gradient(bias)
        if cfg.router_groups:
            choice = limit_to_groups(jax.lax.stop_gradient(choice), cfg.router_groups, cfg.router_topk_groups)
        _, ids = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * cfg.routed_scaling, ids, probs


def limit_to_groups(choice: jax.Array, groups: int, keep: int) -> jax.Array:
    """choice [T, X] with every expert outside each token's `keep` best of `groups` equal groups set
    to -inf (DeepSeek V3: a group scores the sum of its two best choice scores, one if it has one)."""
    tokens, experts = choice.shape
    grouped = choice.reshape(tokens, groups, experts // groups)
    group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, experts // groups))[0], axis=-1)  # [T, groups]
    _, kept = jax.lax.top_k(group_scores, keep)
    allowed = jnp.zeros((tokens, groups), bool).at[jnp.arange(tokens)[:, None], kept].set(True)
    return jnp.where(allowed[:, :, None], grouped, -jnp.inf).reshape(tokens, experts)


def capacity(cfg: ModelConfig, tokens: int) -> int:
    """Assignments one expert takes from `tokens` tokens in capacity-factor mode."""
    return max(1, math.ceil(cfg.capacity_factor * tokens * cfg.experts_per_token / cfg.num_experts))


class MoE(nnx.Module):
    """Router + routed experts (+ an optional shared dense MLP); `__call__(x [B, S, E])` -> (y, Stats)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shared: Callable[[jax.Array], jax.Array] | None = None):
        self.router = nnx.Param(_init(rngs, (cfg.hidden_size, cfg.num_experts), 0, jnp.dtype(jnp.float32)),
                                out_sharding=("embed", "router"))
        self.experts = Experts(cfg, rngs=rngs)
        # DeepSeek V3's selection bias: no gradient reaches it (it only picks experts); the step moves it.
        self.router_bias = nnx.Param(jnp.zeros(cfg.num_experts, jnp.float32), out_sharding=("router",)
                                     ) if cfg.router_bias_update else None
        self.shared = shared
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Stats]:
        cfg = self.cfg
        tokens = x.reshape(-1, x.shape[-1])
        logits = tokens.astype(jnp.float32) @ self.router.get_value().astype(jnp.float32)
        bias = None if self.router_bias is None else self.router_bias.get_value()
        weights, ids, probs = route(cfg, logits, bias)
        out, dropped = self._dispatch(tokens, ids)
        y = jnp.sum(out.reshape(*ids.shape, -1).astype(jnp.float32) * weights[..., None], axis=1).astype(x.dtype)
        if self.shared is not None:
            y = y + self.shared(tokens).astype(y.dtype)
        stats = {
            "load": jax.lax.stop_gradient(jnp.zeros(cfg.num_experts, jnp.float32).at[ids.reshape(-1)].add(1.0)),
            "prob_sum": jnp.sum(probs, axis=0),
            "z_sum": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
            "tokens": jnp.asarray(tokens.shape[0], jnp.float32),
            "dropped": dropped,
        }
        return y.reshape(x.shape), stats

    def _dispatch(self, tokens: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each assignment's expert output [T x k, E] (token-major) and the number dropped."""
        cfg = self.cfg
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        unsort = jnp.argsort(order)
        sorted_ids = flat[order]
        rows = tokens[order // k]
        axis = expert_parallel.current()
        if cfg.capacity_factor:
            out_sorted, dropped = self._capacity(rows, sorted_ids, tokens.shape[0], axis)
        elif axis is None:
            out_sorted = self.experts.grouped(rows, jnp.bincount(flat, length=cfg.num_experts))
            dropped = jnp.zeros((), jnp.float32)
        else:
            out_sorted = expert_parallel.dropless_exchange(rows, sorted_ids, cfg.num_experts, k, axis,
                                                           self.experts.grouped)
            dropped = jnp.zeros((), jnp.float32)
        return out_sorted[unsort], dropped

    def _capacity(self, rows: jax.Array, sorted_ids: jax.Array, num_tokens: int,
                  axis: expert_parallel.ExpertAxis | None) -> tuple[jax.Array, jax.Array]:
        """Sorted rows -> their outputs through a [X, C, E] buffer; assignments past C give 0."""
        cfg = self.cfg
        c = capacity(cfg, num_tokens)
        counts = jnp.bincount(sorted_ids, length=cfg.num_experts)
        rank = jnp.arange(rows.shape[0]) - (jnp.cumsum(counts) - counts)[sorted_ids]
        buffer = jnp.zeros((cfg.num_experts, c, rows.shape[1]), rows.dtype).at[sorted_ids, rank].set(rows, mode="drop")
        if axis is None:
            out = self.experts.dense(buffer)
        else:
            out = expert_parallel.capacity_exchange(buffer, axis, self.experts.dense)
        kept = rank < c
        gathered = out.at[sorted_ids, jnp.minimum(rank, c - 1)].get()
        return jnp.where(kept[:, None], gathered, 0).astype(out.dtype), jnp.sum(~kept).astype(jnp.float32)
