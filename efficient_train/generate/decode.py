"""Batched decoding with a KV cache: the prompts in one prefill, then one token per step.

`generate(model, prompts, ...)` compiles one program per (model structure, prompt batch
shape, token count, sampling options) and runs it whole on the device: a prefill of the
left-padded prompts, then a `lax.scan` of single-token steps, each sampling its next
token (sampling.py). Prompts of different lengths share the batch: padding takes segment
id 0 (never attended) and every row's positions count from its own first token, so a
row's tokens see exactly what they would see alone.

`forward` is the decoder's forward pass with a cache: the model's own embedding, blocks
(each run with its layer's `models.kv_cache.LayerCache` held, which attention reads and
extends), final norm and head. It mirrors `Llama.__call__`'s outer loop, so a change
there must be made here too; tests/test_generate.py checks that greedy decoding equals
the argmax of the full forward pass at every position.

Mesh: the parameters stay where they are (the training plan's shardings: tensor-parallel
heads and MLP, ZeRO-3 shards gathered by the compiler), and the cache is constrained to
the same rules: batch over replica x data when the batch divides, kv heads over tensor
when they divide.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.errors import InputError
from efficient_train.generate.sampling import DEFAULT_SAMPLING, SamplingOptions, next_token
from efficient_train.models import kv_cache
from efficient_train.parallel.sharding import BATCH_AXES

if TYPE_CHECKING:
    from efficient_train.models.llama.model import Llama


@flax.struct.dataclass
class KVCache:
    """Every layer's keys and values [L, B, S, KV, D], the slots' segment ids and positions [B, S],
    and the next free slot."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array


def init_cache(cfg: Any, batch: int, length: int) -> KVCache:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    slots = jnp.zeros((batch, length), jnp.int32)
    return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype), slots, slots, jnp.zeros((), jnp.int32))


def forward(model: Llama, cache: KVCache, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array) -> tuple[jax.Array, KVCache]:
    """fp32 logits [B, T, V] of `tokens` [B, T] placed at the cache's next T slots, and the cache
    holding them."""
    cfg = model.cfg
    start = (0, cache.index)
    kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, start)
    kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions, start)
    x = model.embed_tokens(tokens)
    rope_tables = model.rope_tables(positions)
    windows = jnp.asarray(cfg.layer_windows(), jnp.int32)

    def layer(block: nnx.Module, window: jax.Array, x: jax.Array, k: jax.Array,
              v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        held = kv_cache.LayerCache(k, v, kv_segments, kv_positions, cache.index)
        with kv_cache.caching(held):
            x = block(x, rope_tables, positions, segment_ids, window)
        return x, held.k, held.v

    if cfg.scan_layers:
        graphdef, stacked = nnx.split(model.blocks)

        def body(x: jax.Array, layer_inputs: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            state, window, k, v = layer_inputs
            x, k, v = layer(nnx.merge(graphdef, state), window, x, k, v)
            return x, (k, v)

        x, (ks, vs) = jax.lax.scan(body, x, (stacked, windows, cache.k, cache.v))
    else:
        layer_ks, layer_vs = [], []
        for i, block in enumerate(cast(Sequence[nnx.Module], model.blocks)):  # an nnx.List when not scanned
            x, k, v = layer(block, windows[i], x, cache.k[i], cache.v[i])
            layer_ks.append(k)
            layer_vs.append(v)
        ks, vs = jnp.stack(layer_ks), jnp.stack(layer_vs)
    return model.logits(x), KVCache(ks, vs, kv_segments, kv_positions, cache.index + tokens.shape[1])


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, positions, segment_ids) [B, P] of the prompts right-aligned, and their lengths [B]."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    tokens = np.zeros((len(prompts), width), np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        tokens[row, pad:] = prompt
        positions[row, pad:] = np.arange(len(prompt))
        segments[row, pad:] = 1
    return tokens, positions, segments, lengths


def _cache_sharding(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None, batch: int, kv_heads: int) -> Any:
    """The training rules for the cache: batch over replica x data x expert, kv heads over tensor, where they divide."""
    if mesh is None:
        return None
    shape = dict(mesh.shape)
    batch_axes = BATCH_AXES if batch % math.prod(shape[axis] for axis in BATCH_AXES) == 0 else None
    heads = "tensor" if kv_heads % shape["tensor"] == 0 else None
    return NamedSharding(mesh, P(None, batch_axes, None, heads, None))


@functools.lru_cache(maxsize=16)
def _program(graphdef: nnx.GraphDef, new_tokens: int, options: SamplingOptions, cache_sharding: Any) -> Any:
    """The jitted prefill-and-decode program; jax caches its compilations per input shapes."""

    def run(params: nnx.State, rest: nnx.State, tokens: jax.Array, positions: jax.Array, segments: jax.Array,
            lengths: jax.Array, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, rest)
        batch, width = tokens.shape
        cache = init_cache(model.cfg, batch, width + new_tokens)
        if cache_sharding is not None:
            cache = dataclasses.replace(cache, k=jax.lax.with_sharding_constraint(cache.k, cache_sharding),
                                  v=jax.lax.with_sharding_constraint(cache.v, cache_sharding))
        logits, cache = forward(model, cache, tokens, positions, segments)
        key, draw = jax.random.split(key)
        first = next_token(logits[:, -1], draw, options)

        def step(carry: tuple, _: None) -> tuple[tuple, jax.Array]:
            token, position, cache, key = carry
            key, draw = jax.random.split(key)
            logits, cache = forward(model, cache, token[:, None], position[:, None], jnp.ones_like(token)[:, None])
            chosen = next_token(logits[:, 0], draw, options)
            return (chosen, position + 1, cache, key), chosen

        _, rest_tokens = jax.lax.scan(step, (first, lengths, cache, key), None, length=new_tokens - 1)
        return jnp.concatenate([first[:, None], rest_tokens.T], axis=1)

    return jax.jit(run)


def generate(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             options: SamplingOptions = DEFAULT_SAMPLING, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """Each prompt's next `max_new_tokens` token ids (cut after `eos_id` where it appears).

    `model` is a built-in Llama whose parameters are arrays (placed as training places
    them, or anywhere); `prompts` are lists of token ids, each at least one long.
    """
    options.check()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"--max_new_tokens: {max_new_tokens!r} must be an integer >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("--prompt: every prompt needs at least one token; give text to continue")
    vocab = model.cfg.vocab_size
    for prompt in prompts:
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise InputError(f"--prompt: token id {bad[0]} is outside the model's vocabulary [0, {vocab}); "
                             "use the tokenizer the model was trained with")
    graphdef, params, *others = nnx.split(model, nnx.Param, ...)
    rest = others[0]
    leaves = jax.tree.leaves(params)
    mesh = leaves[0].sharding.mesh if leaves and isinstance(leaves[0].sharding, NamedSharding) else None
    sharding = _cache_sharding(mesh, len(prompts), model.cfg.num_kv_heads)
    program = _program(graphdef, max_new_tokens, options, sharding)
    tokens, positions, segments, lengths = left_pad(prompts)
    out = np.asarray(jax.device_get(program(params, rest, tokens, positions, segments, lengths,
                                            jax.random.key(seed))))
    rows = [row.tolist() for row in out]
    if eos_id is not None:
        rows = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows
