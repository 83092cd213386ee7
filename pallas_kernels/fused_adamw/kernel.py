"""The fused AdamW kernel body and its `pallas_call`, shared by the GPU and TPU backends.

Arrays arrive as a 2-D view of whole blocks: gradients and parameters (N, B) float32,
codes (N, B) uint8 (N, B/2 for 4-bit codes), scales and exponents (N, 1) float32, and
the three per-step scalars. Each program takes `rows` blocks, so one pass over memory
reads every byte of the state once and writes it once: decode, update, re-encode
(`reference.adamw_blocks`, the same function the XLA path runs). The state is updated
in place (input/output aliases), and so are the parameters when the kernel emits them.
gpu.py and tpu.py choose the tile height, where the scalars live and the compiler
parameters; nothing else differs.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.fused_adamw.reference import (
    Blocks,
    Code,
    Hyper,
    Scalars,
    adamw_blocks,
)

_STATE_FIELDS = ("codes", "scales", "exponents")


def _fields(code: Code) -> tuple[str, ...]:
    return _STATE_FIELDS if code.expanded else _STATE_FIELDS[:2]


def _load(ref: Any, parts: int) -> tuple[jax.Array, ...]:
    if parts == 1:
        return (ref[...],)
    half = ref.shape[-1] // 2
    return ref[:, :half], ref[:, half:]


def _store(ref: Any, values: tuple[jax.Array, ...]) -> None:
    if len(values) == 1:
        ref[...] = values[0]
        return
    half = ref.shape[-1] // 2
    ref[:, :half] = values[0]
    ref[:, half:] = values[1]


def _body(m_code: Code, v_code: Code, hyper: Hyper, emit_params: bool, scalars_ref: Any, g_ref: Any, p_ref: Any,
          *refs: Any) -> None:
    nm, nv = len(_fields(m_code)), len(_fields(v_code))
    m_in, v_in = refs[:nm], refs[nm:nm + nv]
    out_ref, m_out, v_out = refs[nm + nv], refs[nm + nv + 1:2 * nm + nv + 1], refs[2 * nm + nv + 1:]

    def blocks(state_refs: tuple) -> Blocks:
        values = [ref[...] for ref in state_refs]
        return Blocks(values[0], values[1], values[2] if len(values) == 3 else None)

    s = Scalars(scalars_ref[0], scalars_ref[1], scalars_ref[2])
    parts = 2 if m_code.bits == 4 else 1
    out, new_m, new_v = adamw_blocks(
        _load(g_ref, parts), _load(p_ref, parts), blocks(m_in), blocks(v_in), m_code, v_code, hyper, s, emit_params
    )
    _store(out_ref, out)
    for state_refs, new in ((m_out, new_m), (v_out, new_v)):
        for ref, value in zip(state_refs, new):
            ref[...] = value


def fused_adamw_call(
    g: jax.Array, p: jax.Array, m: Blocks, v: Blocks, scalars: Scalars, *, m_code: Code, v_code: Code, hyper: Hyper,
    emit_params: bool, rows: int, scalar_spec: pl.BlockSpec, scalar_size: int, compiler_params: Any, interpret: bool,
) -> tuple[jax.Array, Blocks, Blocks]:
    """Run the kernel over all N blocks, `rows` blocks per program."""
    n, block = g.shape
    grid = (pl.cdiv(n, rows),)
    dense = pl.BlockSpec((rows, block), lambda i: (i, 0))

    def state_specs(state: Blocks, code: Code) -> list[pl.BlockSpec]:
        return [pl.BlockSpec((rows, getattr(state, f).shape[1]), lambda i: (i, 0)) for f in _fields(code)]

    def state_args(state: Blocks, code: Code) -> list[jax.Array]:
        return [getattr(state, f) for f in _fields(code)]

    packed = jnp.zeros((scalar_size,), jnp.float32).at[:3].set(jnp.stack(scalars).astype(jnp.float32))
    args = [packed, g, p, *state_args(m, m_code), *state_args(v, v_code)]
    in_specs = [scalar_spec, dense, dense, *state_specs(m, m_code), *state_specs(v, v_code)]
    out_args = [p, *state_args(m, m_code), *state_args(v, v_code)]
    out_specs = [dense, *state_specs(m, m_code), *state_specs(v, v_code)]
    first_state = 3
    aliases = {first_state + i: 1 + i for i in range(len(out_args) - 1)}
    if emit_params:
        aliases[2] = 0
    outs = pl.pallas_call(
        functools.partial(_body, m_code, v_code, hyper, emit_params),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in out_args],
        input_output_aliases=aliases,
        compiler_params=compiler_params,
        interpret=interpret,
    )(*args)
    nm = len(_fields(m_code))
    new_m, new_v = outs[1:1 + nm], outs[1 + nm:]
    return (
        outs[0],
        Blocks(new_m[0], new_m[1], new_m[2] if m_code.expanded else None),
        Blocks(new_v[0], new_v[1], new_v[2] if v_code.expanded else None),
    )
