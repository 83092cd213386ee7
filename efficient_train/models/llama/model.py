"""The Llama-family decoder: embeddings, pre-norm blocks, final norm, output head.

Block: x += Attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), with RoPE on q and k and
grouped-query attention through the one dispatch function `models.attention`.

Decisions:
- Layers run as a pure function of one layer's nnx.State: `nnx.merge(graphdef,
  param_gather.gather(state))` then the block. The scan and the python loop share that
  function, so the two layouts compute the same thing, remat wraps exactly one layer,
  and ZeRO-3's per-layer all-gather sits inside the remat boundary (gathered weights
  are re-gathered in the backward, not kept, unless remat is 'none').
- `scan_layers=True` stores one Block whose parameters have a leading layer axis
  (logical name 'layers' prepended to `out_sharding`) and runs `jax.lax.scan` over its
  state, so compile time stays flat in depth. The stack is built with `jax.vmap` over
  per-layer keys and the 'layers' name is added here, using only core NNX APIs
  (split/merge/state, Variable metadata) rather than NNX's lifted transforms. Variable
  metadata (logical axes, the trainer's `zero_dim`) rides through scan, vmap and
  shard_map as pytree auxiliary data, so it is intact inside the layer function.
- `scan_layers=False` keeps an `nnx.List` of Blocks (state paths blocks/0/..., ...).
- Non-layer parameters (embedding, final norm, output head) are gathered at each use;
  a tied embedding is therefore gathered twice under ZeRO-3 (lookup and output), which
  trades one extra all-gather for not holding the full table across the forward.
- The model adds no activation sharding constraints; the trainer's compiler-driven
  sharding and the sequence-parallel attention handle activations.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_train.models.attention import attention
from efficient_train.models.layers import Embed, Linear, RMSNorm, apply_rope, rope_angles
from efficient_train.models.llama.config import ModelConfig
from efficient_train.parallel import param_gather
from efficient_train.parallel.sharding import LAYER_AXIS


def _dtypes(cfg: ModelConfig) -> dict[str, jnp.dtype]:
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


class Attention(nnx.Module):
    """GQA self-attention with rotary q, k; kernels q/k/v (embed, [kv_]heads, head_dim), o (heads, head_dim, embed)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = _dtypes(cfg)
        self.q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), **dt, rngs=rngs)
        self.k = Linear((e,), (kv, d), ("embed", "kv_heads", "head_dim"), **dt, rngs=rngs)
        self.v = Linear((e,), (kv, d), ("embed", "kv_heads", "head_dim"), **dt, rngs=rngs)
        self.o = Linear((h, d), (e,), ("heads", "head_dim", "embed"), **dt, rngs=rngs)
        self.impl = cfg.attention_impl

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
        q = apply_rope(self.q(x), cos, sin)
        k = apply_rope(self.k(x), cos, sin)
        out = attention(q, k, self.v(x), segment_ids=segment_ids, positions=positions,
                        causal=True, impl=self.impl)
        return self.o(out)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up ('embed', 'mlp'), down ('mlp', 'embed')."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.intermediate_size
        dt = _dtypes(cfg)
        self.gate = Linear((e,), (m,), ("embed", "mlp"), **dt, rngs=rngs)
        self.up = Linear((e,), (m,), ("embed", "mlp"), **dt, rngs=rngs)
        self.down = Linear((m,), (e,), ("mlp", "embed"), **dt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, impl=cfg.norm_impl, **dt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, impl=cfg.norm_impl, **dt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, segment_ids)
        return x + self.mlp(self.mlp_norm(x))


def _stacked_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter has a leading layer axis named 'layers'."""
    graphdefs: list[nnx.GraphDef] = []  # the (static) structure, recorded while vmap traces

    def init_layer(key: jax.Array) -> nnx.State:
        graphdef, state = nnx.split(Block(cfg, rngs=nnx.Rngs(params=key)))
        graphdefs.append(graphdef)
        return state

    state = jax.vmap(init_layer)(jax.random.split(rngs.params(), cfg.num_layers))
    for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = tuple(variable.get_metadata()["out_sharding"])
        variable.set_metadata(out_sharding=(LAYER_AXIS,) + axes)
    return nnx.merge(graphdefs[0], state)


def _layer_fn(graphdef: nnx.GraphDef, stacked_dims: int, state: nnx.State, x: jax.Array,
              cos: jax.Array, sin: jax.Array, positions: jax.Array,
              segment_ids: jax.Array) -> jax.Array:
    """One layer as a pure function of its state; ZeRO-3 gathers its weights here."""
    block = nnx.merge(graphdef, param_gather.gather(state, stacked_dims=stacked_dims))
    return block(x, cos, sin, positions, segment_ids)


def _remat(fn: Callable, policy: str, prevent_cse: bool) -> Callable:
    if policy == "none":
        return fn
    saved = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint(fn, policy=saved, prevent_cse=prevent_cse)


class Llama(nnx.Module):
    """Decoder-only LM. `__call__(inputs, positions, segment_ids)` -> fp32 logits [B, S, vocab].

    inputs: int token ids [B, S]; positions: int position of each token inside its
    document [B, S]; segment_ids: int document id per token [B, S], 0 = padding.
    Without positions and segment ids each row is one unpadded document.

    Parameters (logical axes; scanned layers prepend 'layers'):
      embed.embedding                   ('vocab', 'embed')
      blocks.attn_norm.scale            ('norm',)       blocks.mlp_norm.scale ('norm',)
      blocks.attn.q.kernel              ('embed', 'heads', 'head_dim')
      blocks.attn.k.kernel, .v.kernel   ('embed', 'kv_heads', 'head_dim')
      blocks.attn.o.kernel              ('heads', 'head_dim', 'embed')
      blocks.mlp.gate.kernel, .up.kernel ('embed', 'mlp')
      blocks.mlp.down.kernel            ('mlp', 'embed')
      final_norm.scale                  ('norm',)
      lm_head.kernel                    ('embed', 'vocab')   (absent when tied)
    """

    # Tells the trainer that ZeRO-3 gathers happen here, layer by layer (param_gather),
    # so it must not gather the whole model up front.
    gathers_params_per_layer = True

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, **dt, rngs=rngs)
        if cfg.scan_layers:
            self.blocks = _stacked_block(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, impl=cfg.norm_impl, **dt)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), **dt, rngs=rngs)

    def __call__(self, inputs: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if positions is None:  # one document per row
            positions = jnp.broadcast_to(jnp.arange(inputs.shape[-1], dtype=jnp.int32), inputs.shape)
        if segment_ids is None:  # no padding
            segment_ids = jnp.ones(inputs.shape, jnp.int32)
        x = param_gather.gather(self.embed)(inputs)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            # Inside scan the body is traced once, so CSE cannot merge recomputation away.
            layer = _remat(functools.partial(_layer_fn, graphdef, 1), cfg.remat, prevent_cse=False)

            def body(x: jax.Array, state: nnx.State) -> tuple[jax.Array, None]:
                return layer(state, x, cos, sin, positions, segment_ids), None

            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for block in self.blocks:
                graphdef, state = nnx.split(block)
                layer = _remat(functools.partial(_layer_fn, graphdef, 0), cfg.remat, prevent_cse=True)
                x = layer(state, x, cos, sin, positions, segment_ids)
        x = param_gather.gather(self.final_norm)(x)
        if self.lm_head is None:
            return param_gather.gather(self.embed).attend(x)
        return param_gather.gather(self.lm_head)(x, out_dtype=jnp.float32)
