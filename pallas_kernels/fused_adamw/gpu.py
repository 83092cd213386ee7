"""The fused AdamW kernel on NVIDIA GPUs, compiled by Triton.

A program takes `rows` blocks (4096 elements by default: 16 blocks of 256), enough
work per program to stream at memory bandwidth with 4 warps; the three scalars are a
small array every program loads. Triton compiler parameters are given explicitly,
since `pallas_call` on GPU may otherwise select Mosaic GPU.
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fused_adamw.kernel import fused_adamw_call
from pallas_kernels.fused_adamw.reference import Blocks, Code, Hyper, Scalars

ELEMENTS_PER_PROGRAM = 4096


def default_rows(block: int) -> int:
    return max(1, ELEMENTS_PER_PROGRAM // block)


def call(g: jax.Array, p: jax.Array, m: Blocks, v: Blocks, scalars: Scalars, *, m_code: Code, v_code: Code,
         hyper: Hyper, emit_params: bool, rows: int | None, interpret: bool) -> tuple[jax.Array, Blocks, Blocks]:
    return fused_adamw_call(
        g, p, m, v, scalars, m_code=m_code, v_code=v_code, hyper=hyper, emit_params=emit_params,
        rows=rows or default_rows(g.shape[1]),
        scalar_spec=pl.BlockSpec((4,), lambda i: (0,)), scalar_size=4,  # Triton blocks are powers of two
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
    )
