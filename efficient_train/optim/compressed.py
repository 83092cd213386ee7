"""AdamW with compressed moments (bf16, int8, fp8, int4): the transformation itself.

`CompressedAdamW` is what `adamw(state_format=...)` builds for every format but fp32.
Its state is `CompressedAdamState(count, mu, nu)`, mu and nu shaped like the
parameters, each leaf stored one of three ways, decided once from the global shape:
- a `Quantized` moment (block formats) when the leaf is eligible (`quantize_mask`,
  default: at least 2 axes), has at least `min_quantized_size` elements and a block
  size divides its last axis; nu then holds sqrt(v) (the unsigned map keeps it away
  from zero, so no element's step is ever m / eps);
- a bfloat16 array (bf16 format, eligible leaves);
- a float32 array otherwise (small tensors, norms): these leaves run optax's own
  arithmetic, operation for operation.

One step decodes a leaf's moments, updates them in fp32 exactly as optax.scale_by_adam
does, computes the update from the fp32 moments (bias correction, eps, decoupled weight
decay under `mask`, -learning rate) and re-encodes: the update never sees its own
rounding, which enters the next step only. Block leaves run either the plain-JAX block
arithmetic, partitioned by the compiler like any elementwise code (per-block reductions
stay on the device that holds the block whenever the local extent of the last axis is a
multiple of B), or the fused Pallas kernel (`kernel`), which runs per device inside a
`shard_map` over the `shardings` the caller gives (the state's placement); a leaf whose
shards cut through blocks runs the plain-JAX path there.

`apply` returns new parameters instead of updates, so the kernel writes them in its
single pass (`optim.apply_updates` uses it); `update` keeps the optax contract.

Non-finite gradients: the transformation does not skip anything (optax.adamw does not
either). A NaN or inf gradient element gets a NaN update at once, as in optax, and
makes its block's new scales non-finite, so from the next step on the whole block
(B elements) decodes to NaN and updates to NaN; other blocks are untouched. The
trainer never lets such a step reach the state: it skips steps whose gradient norm is
not finite.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.optim import quant
from efficient_train.optim.quant import Quantized
from pallas_kernels.backends import default_interpret, resolve_backend
from pallas_kernels.fused_adamw import api as fused_api
from pallas_kernels.fused_adamw import reference
from pallas_kernels.fused_adamw.reference import Blocks, Hyper, Scalars

Mask = Any  # a tree of bools (or a prefix of the params tree), or a callable params -> such a tree
LeafStep = tuple[jax.Array, Any, Any]  # (new param or update, new first moment, new second moment)


@flax.struct.dataclass
class CompressedAdamState:
    count: Any  # int32 scalar (or its sharding, where optim/placement.py maps the state)
    mu: Any  # per leaf: Quantized | bfloat16 | float32 first moment
    nu: Any  # per leaf: Quantized sqrt(v) | bfloat16 v | float32 v


def _is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def _flags(mask: Mask, params: Any, default: Callable[[Any], bool]) -> list[bool]:
    """One bool per parameter leaf, from a mask tree (or prefix, or callable)."""
    if mask is None:
        return [default(p) for p in jax.tree.leaves(params)]
    tree = mask(params) if callable(mask) else mask
    full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), tree, params)
    return jax.tree.leaves(full)


def local_extent_is_aligned(shape: tuple[int, ...], sharding: NamedSharding, block: int) -> bool:
    """Whether each device's part of the last axis is a whole number of blocks."""
    return sharding.shard_shape(shape)[-1] % block == 0


@dataclasses.dataclass(frozen=True, eq=False)
class CompressedAdamW:
    learning_rate: float | optax.Schedule
    b1: float
    b2: float
    eps: float
    eps_root: float
    weight_decay: float
    state_format: str
    block_size: int
    min_quantized_size: int
    mask: Mask
    quantize_mask: Mask
    kernel: str  # 'auto' | 'xla' | 'pallas'
    shardings: Any  # tree of NamedSharding shaped like the params (where the state lives), or None

    # ---- layout -------------------------------------------------------------------------

    def _init_leaf(self, p: jax.Array, eligible: bool) -> tuple[Any, ...]:
        shape = tuple(p.shape)
        eligible = eligible and int(np.prod(shape, dtype=np.int64)) >= self.min_quantized_size
        if eligible and self.state_format == "bf16":
            return jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)  # two buffers: both are donated
        block = quant.leaf_block_size(shape, self.block_size) if eligible else None
        if block is None:
            return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
        m_code, v_code = quant.BLOCK_FORMATS[self.state_format]
        return tuple(
            quant.quantize_blocks(jnp.zeros(shape, jnp.float32), code, block) for code in (m_code, v_code)
        )

    def init(self, params: Any) -> CompressedAdamState:
        leaves, treedef = jax.tree.flatten(params)
        eligible = _flags(self.quantize_mask, params, lambda p: jnp.ndim(p) >= 2)
        moments = [self._init_leaf(p, flag) for p, flag in zip(leaves, eligible)]
        return CompressedAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.unflatten(treedef, [m for m, _ in moments]),
            nu=jax.tree.unflatten(treedef, [v for _, v in moments]),
        )

    # ---- step ---------------------------------------------------------------------------

    def _scalars(self, count: jax.Array) -> Scalars:
        lr = self.learning_rate(count) if callable(self.learning_rate) else self.learning_rate
        count_inc = optax.safe_increment(count)
        return Scalars(
            neg_lr=jnp.asarray(-1 * lr, jnp.float32),
            bias1=(1 - self.b1 ** count_inc).astype(jnp.float32),
            bias2=(1 - self.b2 ** count_inc).astype(jnp.float32),
        )

    def _hyper(self, decays: bool) -> Hyper:
        return Hyper(self.b1, self.b2, self.eps, self.eps_root, self.weight_decay if decays else 0.0)

    def _use_kernel(self) -> tuple[bool, str, bool]:
        """(use the Pallas kernel, its backend, interpret)."""
        interpret = default_interpret()
        if self.kernel == "xla" or (self.kernel == "auto" and interpret):
            return False, "xla", False
        return True, resolve_backend("auto", interpret), interpret

    def _dense_leaf(self, g: jax.Array, p: jax.Array, m: jax.Array, v: jax.Array, hyper: Hyper, s: Scalars,
                    emit_params: bool) -> LeafStep:
        m, v = reference.adam_moments(g, m.astype(jnp.float32), v.astype(jnp.float32), hyper)
        u = reference.adam_update(m, v, p, hyper, s)
        out = jnp.asarray(p + u).astype(p.dtype) if emit_params else u
        return out, m, v

    def _xla_block_leaf(self, g: jax.Array, p: jax.Array, mq: Quantized, vq: Quantized, hyper: Hyper, s: Scalars,
                        emit_params: bool) -> LeafStep:
        code, block = mq.code, mq.block
        out, new_m, new_v = reference.adamw_blocks(
            reference.split(quant.to_blocks(g, block), code), reference.split(quant.to_blocks(p, block), code),
            quant.as_blocks(mq), quant.as_blocks(vq), mq.code, vq.code, hyper, s, emit_params,
        )
        return (
            reference.join(out).reshape(g.shape),
            quant.from_blocks(new_m, mq.code, block),
            quant.from_blocks(new_v, vq.code, block),
        )

    def _kernel_block_leaf(self, g: jax.Array, p: jax.Array, mq: Quantized, vq: Quantized, hyper: Hyper, s: Scalars,
                           emit_params: bool, backend: str, interpret: bool) -> LeafStep:
        block = mq.block

        def rows(q: Quantized) -> Blocks:
            b = quant.as_blocks(q)
            flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])
            return Blocks(flat(b.codes), flat(b.scales), flat(b.exponents))

        def back(b: Blocks, like: Quantized) -> Quantized:
            shaped = lambda x, ref: None if x is None else x.reshape(ref.shape)
            return dataclasses.replace(like, codes=shaped(b.codes, like.codes), scales=shaped(b.scales, like.scales),
                                       exponents=shaped(b.exponents, like.exponents))

        out, new_m, new_v = fused_api.fused_adamw(
            g.reshape(-1, block), p.reshape(-1, block), rows(mq), rows(vq), s, m_code=mq.code, v_code=vq.code,
            hyper=hyper, emit_params=emit_params, backend=backend, interpret=interpret,
        )
        return out.reshape(g.shape), back(new_m, mq), back(new_v, vq)

    def _kernel_block_leaf_on(self, sharding: NamedSharding | None, g: jax.Array, p: jax.Array, mq: Quantized,
                              vq: Quantized, hyper: Hyper, s: Scalars, emit_params: bool, backend: str,
                              interpret: bool) -> LeafStep:
        """The kernel on each device's shard (shard_map over the state's sharding), or whole."""

        def run(g: jax.Array, p: jax.Array, mq: Quantized, vq: Quantized, s: Scalars) -> LeafStep:
            return self._kernel_block_leaf(g, p, mq, vq, hyper, s, emit_params, backend, interpret)

        if sharding is None:
            return run(g, p, mq, vq, s)
        spec = sharding.spec

        def state_spec(q: Quantized) -> Quantized:
            return dataclasses.replace(q, codes=spec, scales=spec, exponents=None if q.exponents is None else spec)

        return jax.shard_map(
            run, mesh=sharding.mesh, in_specs=(spec, spec, state_spec(mq), state_spec(vq), P()),
            out_specs=(spec, state_spec(mq), state_spec(vq)), check_vma=False,
        )(g, p, mq, vq, s)

    def _step(self, grads: Any, state: CompressedAdamState, params: Any, emit_params: bool) -> tuple[Any, CompressedAdamState]:
        if params is None:
            if self.weight_decay or emit_params:
                raise ValueError(optax.NO_PARAMS_MSG)
            params = grads  # read by no arithmetic: weight decay is off
        g_leaves, treedef = jax.tree.flatten(grads)
        treedef_: Any = treedef  # jax's stub lacks flatten_up_to
        p_leaves = treedef_.flatten_up_to(params)
        m_leaves = treedef_.flatten_up_to(state.mu)
        v_leaves = treedef_.flatten_up_to(state.nu)
        decays = _flags(self.mask, params, lambda p: True)
        shardings = treedef_.flatten_up_to(self.shardings) if self.shardings is not None else [None] * len(g_leaves)
        s = self._scalars(state.count)
        use_kernel, backend, interpret = self._use_kernel()
        outs, mus, nus = [], [], []
        for g, p, m, v, decay, sharding in zip(g_leaves, p_leaves, m_leaves, v_leaves, decays, shardings):
            hyper = self._hyper(decay)
            g = g.astype(jnp.float32)
            if not _is_quantized(m):
                out, new_m, new_v = self._dense_leaf(g, p, m, v, hyper, s, emit_params)
                new_m, new_v = new_m.astype(m.dtype), new_v.astype(v.dtype)
            elif use_kernel and (sharding is None or local_extent_is_aligned(tuple(g.shape), sharding, m.block)):
                out, new_m, new_v = self._kernel_block_leaf_on(sharding, g, p.astype(jnp.float32), m, v, hyper, s,
                                                               emit_params, backend, interpret)
            else:
                out, new_m, new_v = self._xla_block_leaf(g, p.astype(jnp.float32), m, v, hyper, s, emit_params)
            outs.append(out.astype(p.dtype) if emit_params else out)
            mus.append(new_m)
            nus.append(new_v)
        new_state = CompressedAdamState(
            count=optax.safe_increment(state.count),
            mu=jax.tree.unflatten(treedef, mus),
            nu=jax.tree.unflatten(treedef, nus),
        )
        return jax.tree.unflatten(treedef, outs), new_state

    def update(self, grads: Any, state: CompressedAdamState, params: Any = None) -> tuple[Any, CompressedAdamState]:
        """optax contract: (updates, new state)."""
        return self._step(grads, state, params, emit_params=False)

    def apply(self, grads: Any, state: CompressedAdamState, params: Any) -> tuple[Any, CompressedAdamState]:
        """(new parameters, new state): the update applied in the same pass."""
        return self._step(grads, state, params, emit_params=True)
