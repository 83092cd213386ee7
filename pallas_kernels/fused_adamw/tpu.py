"""The fused AdamW kernel on TPUs, compiled by Mosaic.

A program takes `rows` blocks, a multiple of 32 (the sublane tiling of 8-bit arrays)
or all of them when there are fewer; the scalars live in SMEM. The grid axis is
parallel: blocks are independent, so megacore chips split it between their cores.
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.fused_adamw.kernel import fused_adamw_call
from pallas_kernels.fused_adamw.reference import Blocks, Code, Hyper, Scalars

DEFAULT_ROWS = 128


def call(g: jax.Array, p: jax.Array, m: Blocks, v: Blocks, scalars: Scalars, *, m_code: Code, v_code: Code,
         hyper: Hyper, emit_params: bool, rows: int | None, interpret: bool) -> tuple[jax.Array, Blocks, Blocks]:
    rows = rows or DEFAULT_ROWS
    if rows % 32:
        raise ValueError(f"rows: {rows} must be a multiple of 32 on TPU")
    return fused_adamw_call(
        g, p, m, v, scalars, m_code=m_code, v_code=v_code, hyper=hyper, emit_params=emit_params,
        rows=min(rows, g.shape[0]),
        scalar_spec=pl.BlockSpec(memory_space=pltpu.SMEM), scalar_size=3,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)), interpret=interpret,
    )
