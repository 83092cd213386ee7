"""The Llama-family decoder: embeddings, pre-norm blocks, final norm, output head.

Block: x += Attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), with RoPE on q and k and
grouped-query attention through the one dispatch function `models.attention`. The
family fields of `ModelConfig` turn the same decoder into Llama 3 (RoPE scaling, in
models/rope.py), Qwen 2 (q/k/v biases), Qwen 3 (q/k RMSNorm before RoPE), Mistral
(a sliding window on every layer) and Gemma 2/3 (GeGLU, (1 + w) norms, scaled
embeddings, norms after attention and MLP too, soft-capping, local and global layers).

Decisions:
- Layers run as a pure function of one layer's nnx.State: `nnx.merge(graphdef,
  param_gather.gather(state))` then the block. The scan and the python loop share that
  function, so the two layouts compute the same thing, remat wraps exactly one layer
  (the policies, and the names of the values they keep, are in models/remat.py),
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
- Layers differ only in data, never in structure: each layer's sliding window (0 for a
  global layer) is an int the scan carries beside the layer's parameters, and a
  windowed layer with its own RoPE base picks the local cos/sin by that int. One
  compiled layer therefore serves Gemma's local and global layers, the Pallas kernel
  included (it reads the window as a traced scalar).
- Non-layer parameters (embedding, final norm, output head) are gathered at each use;
  a tied embedding is therefore gathered twice under ZeRO-3 (lookup and output), which
  trades one extra all-gather for not holding the full table across the forward.
- The model adds no activation sharding constraints; the trainer's compiler-driven
  sharding and the sequence-parallel attention handle activations.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from efficient_train.models import lora, moe, rope
from efficient_train.models import remat as names
from efficient_train.models.attention import attention
from efficient_train.models.layers import Embed, Linear, RMSNorm, apply_rope
from efficient_train.models.llama.config import ModelConfig
from efficient_train.models.remat import remat
from efficient_train.parallel import param_gather
from efficient_train.parallel.sharding import LAYER_AXIS

# (cos, sin) of the global layers, and of the windowed layers when they have their own
# plain RoPE (local_rope_theta), else None.
Rope = tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array] | None]


def _dtypes(cfg: ModelConfig) -> dict[str, Any]:
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


def _layer_dtypes(cfg: ModelConfig) -> dict[str, Any]:
    """A decoder layer's Linear arguments: the dtypes and the matmul precision (fp8 or not)."""
    return {**_dtypes(cfg), "precision": cfg.matmul_precision}


def _norm(cfg: ModelConfig, size: int) -> RMSNorm:
    return RMSNorm(size, eps=cfg.rms_norm_eps, impl=cfg.norm_impl, plus_one=cfg.norm_plus_one, **_dtypes(cfg))


def _softcap(x: jax.Array, cap: float) -> jax.Array:
    return cap * jnp.tanh(x / cap) if cap else x


class Attention(nnx.Module):
    """GQA self-attention with rotary q, k; kernels q/k/v (embed, [kv_]heads, head_dim), o (heads, head_dim, embed).

    Optional: biases on q/k/v (qkv_bias) and o (o_bias), RMSNorms over head_dim on q and
    k before RoPE (qk_norm); scores scaled by query_pre_attn_scalar^-1/2 when it is set.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = _layer_dtypes(cfg)
        self.q = Linear((e,), (h, d), ("embed", "heads", "head_dim"), **dt, rngs=rngs, bias=cfg.qkv_bias)
        self.k = Linear((e,), (kv, d), ("embed", "kv_heads", "head_dim"), **dt, rngs=rngs, bias=cfg.qkv_bias)
        self.v = Linear((e,), (kv, d), ("embed", "kv_heads", "head_dim"), **dt, rngs=rngs, bias=cfg.qkv_bias)
        self.o = Linear((h, d), (e,), ("heads", "head_dim", "embed"), **dt, rngs=rngs, bias=cfg.o_bias)
        self.q_norm = _norm(cfg, d) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, d) if cfg.qk_norm else None
        self.impl = cfg.attention_impl
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.softcap = cfg.attn_softcap or None
        self.windowed = cfg.sliding_window > 0

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array, window: jax.Array) -> jax.Array:
        q, k = checkpoint_name(self.q(x), names.Q_NAME), checkpoint_name(self.k(x), names.K_NAME)
        v = checkpoint_name(self.v(x), names.V_NAME)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, segment_ids=segment_ids,
                        positions=positions, causal=True, impl=self.impl, scale=self.scale,
                        window=window if self.windowed else None, softcap=self.softcap)
        return checkpoint_name(self.o(checkpoint_name(out, names.ATTENTION_NAME)), names.O_NAME)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-gelu (GeGLU);
    gate/up ('embed', 'mlp'), down ('mlp', 'embed')."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, size: int = 0):
        e, m = cfg.hidden_size, size or cfg.intermediate_size
        dt = _layer_dtypes(cfg)
        self.gate = Linear((e,), (m,), ("embed", "mlp"), **dt, rngs=rngs)
        self.up = Linear((e,), (m,), ("embed", "mlp"), **dt, rngs=rngs)
        self.down = Linear((m,), (e,), ("mlp", "embed"), **dt, rngs=rngs)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = checkpoint_name(self.gate(x), names.GATE_NAME)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return checkpoint_name(self.down(act * checkpoint_name(self.up(x), names.UP_NAME)), names.DOWN_NAME)


def _feed_forward(cfg: ModelConfig, layer: int, rngs: nnx.Rngs) -> MLP | moe.MoE:
    """The dense MLP, or the MoE block (with its shared experts as one dense MLP) on an MoE layer."""
    if not cfg.is_moe_layer(layer):
        return MLP(cfg, rngs=rngs)
    shared = MLP(cfg, rngs=rngs, size=cfg.shared_experts * cfg.expert_size) if cfg.shared_experts else None
    return moe.MoE(cfg, rngs=rngs, shared=shared)


class Block(nnx.Module):
    """One pre-norm decoder layer; with sandwich_norms also a norm on each branch's output.
    `forward` also returns the MoE router statistics ({} on a dense layer)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        self.attn_norm = _norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg, cfg.hidden_size)
        self.mlp = _feed_forward(cfg, layer, rngs)
        self.post_attn_norm = _norm(cfg, cfg.hidden_size) if cfg.sandwich_norms else None
        self.post_mlp_norm = _norm(cfg, cfg.hidden_size) if cfg.sandwich_norms else None

    def __call__(self, x: jax.Array, rope_tables: Rope, positions: jax.Array, segment_ids: jax.Array,
                 window: jax.Array) -> jax.Array:
        return self.forward(x, rope_tables, positions, segment_ids, window)[0]

    def forward(self, x: jax.Array, rope_tables: Rope, positions: jax.Array, segment_ids: jax.Array,
                window: jax.Array) -> tuple[jax.Array, moe.Stats]:
        (cos, sin), local = rope_tables
        if local is not None:  # windowed layers have their own RoPE
            cos, sin = (jnp.where(window > 0, a, b) for a, b in zip(local, (cos, sin)))
        h = self.attn(self.attn_norm(x), cos, sin, positions, segment_ids, window)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        stats: moe.Stats = {}
        if isinstance(self.mlp, moe.MoE):
            h, stats = self.mlp(self.mlp_norm(x))
        else:
            h = self.mlp(self.mlp_norm(x))
        return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h)), stats


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


def _layer_fn(graphdef: nnx.GraphDef, stacked_dims: int, state: nnx.State, window: jax.Array, index: jax.Array,
              x: jax.Array, rope_tables: Rope, positions: jax.Array, segment_ids: jax.Array
              ) -> tuple[jax.Array, moe.Stats]:
    """One layer as a pure function of its state, window and index (LoRA dropout draws per layer);
    ZeRO-3 gathers its weights here. Returns the layer's output and its MoE router statistics."""
    block = nnx.merge(graphdef, param_gather.gather(state, stacked_dims=stacked_dims))
    with lora.layer_dropout(index):
        return block.forward(x, rope_tables, positions, segment_ids, window)


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
    and with the family fields:
      blocks.attn.{q,k,v}.bias          ([kv_]heads, head_dim)   (qkv_bias)
      blocks.attn.o.bias                ('embed',)               (o_bias)
      blocks.attn.{q,k}_norm.scale      ('norm',)                (qk_norm)
      blocks.post_{attn,mlp}_norm.scale ('norm',)                (sandwich_norms)
    and on an MoE layer (num_experts > 0; models/moe.py), instead of blocks.mlp.{gate,up,down}:
      blocks.mlp.router                 ('embed', 'router')      fp32
      blocks.mlp.experts.gate, .up      ('experts', 'embed', 'expert_mlp')
      blocks.mlp.experts.down           ('experts', 'expert_mlp', 'embed')
      blocks.mlp.shared.{gate,up,down}.kernel  as the dense MLP's       (shared_experts)
    """

    # Tells the trainer that ZeRO-3 gathers happen here, layer by layer (param_gather),
    # so it must not gather the whole model up front.
    gathers_params_per_layer = True

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, **dt, rngs=rngs)
        self.blocks: Any  # one Block with stacked parameters (scan_layers), else an nnx.List of Blocks
        if cfg.scan_layers:
            self.blocks = _stacked_block(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs, layer=i) for i in range(cfg.num_layers)])
        self.final_norm = _norm(cfg, cfg.hidden_size)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), **dt, rngs=rngs)

    def __call__(self, inputs: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.output_head().logits(self.hidden(inputs, positions, segment_ids))

    def hidden(self, inputs: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        """The final-normed hidden states [B, S, hidden] in the compute dtype: what the head
        turns into logits, and what a vocabulary-chunked loss takes instead of the logits."""
        cfg = self.cfg
        if positions is None:  # one document per row
            positions = jnp.broadcast_to(jnp.arange(inputs.shape[-1], dtype=jnp.int32), inputs.shape)
        if segment_ids is None:  # no padding
            segment_ids = jnp.ones(inputs.shape, jnp.int32)
        x = self.embed_tokens(inputs)
        rope_tables = self.rope_tables(positions)
        windows = jnp.asarray(cfg.layer_windows(), jnp.int32)
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            # Inside scan the body is traced once, so CSE cannot merge recomputation away.
            layer = remat(functools.partial(_layer_fn, graphdef, 1), cfg.remat, prevent_cse=False)

            def body(x: jax.Array, xs: tuple[nnx.State, jax.Array, jax.Array]) -> tuple[jax.Array, moe.Stats]:
                state, window, index = xs
                return layer(state, window, index, x, rope_tables, positions, segment_ids)

            x, stats = jax.lax.scan(body, x, (stacked, windows, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
        else:
            per_layer = []
            for i, block in enumerate(self.blocks):
                graphdef, state = nnx.split(block)
                layer = remat(functools.partial(_layer_fn, graphdef, 0), cfg.remat, prevent_cse=True)
                x, layer_stats = layer(state, windows[i], jnp.int32(i), x, rope_tables, positions, segment_ids)
                per_layer += [layer_stats] if layer_stats else []
            stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer else {}
        if stats:
            moe.record(stats)  # [MoE layers, ...] each, for the train step's balance loss and metrics
        return param_gather.gather(self.final_norm)(x)

    # The pieces around the layers, shared by __call__ and KV-cache decoding (generate/decode.py).

    def embed_tokens(self, inputs: jax.Array) -> jax.Array:
        """Token embeddings [B, S, hidden] (scaled by sqrt(hidden) where the family does)."""
        x = param_gather.gather(self.embed)(inputs)
        if self.cfg.embed_scale:  # in the compute dtype, as transformers scales in the weights' dtype
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        return x

    def rope_tables(self, positions: jax.Array) -> Rope:
        """The global RoPE (cos, sin) of `positions` and, with local_rope_theta, the windowed layers' own."""
        cfg = self.cfg
        local = rope.angles(cfg, positions, local=True) if cfg.local_rope_theta else None
        return rope.angles(cfg, positions), local

    def logits(self, x: jax.Array) -> jax.Array:
        """fp32 logits [B, S, vocab] of the last layer's output (final norm, head, soft-cap)."""
        return self.output_head().logits(param_gather.gather(self.final_norm)(x))

    def output_head(self) -> OutputHead:
        """The output projection's weight (ZeRO-3-gathered) and how to apply it."""
        if self.lm_head is None:
            weight, vocab_major = param_gather.gather(self.embed).embedding.get_value(), True
        else:
            weight, vocab_major = param_gather.gather(self.lm_head).kernel.get_value(), False
        return OutputHead(weight, vocab_major, jnp.dtype(self.cfg.dtype), self.cfg.final_softcap)


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """The output projection as data: `weight` as stored ([vocab, hidden] when `vocab_major`, the
    tied embedding; else the head's [hidden, vocab]), cast to `dtype` at use, logits soft-capped
    at `softcap` (0: off). `logits` is the whole-vocabulary product; the chunked loss
    (train/chunked_loss.py) applies the same arithmetic one slice of the vocabulary at a time."""

    weight: jax.Array
    vocab_major: bool
    dtype: jnp.dtype
    softcap: float

    def logits(self, x: jax.Array) -> jax.Array:
        """x [..., hidden] -> fp32 logits [..., vocab]."""
        spec = "...e,ve->...v" if self.vocab_major else "...e,ev->...v"
        logits = jnp.einsum(spec, x.astype(self.dtype), self.weight.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return _softcap(logits, self.softcap)
