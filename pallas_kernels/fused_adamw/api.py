"""`fused_adamw`: one AdamW step on quantized blocks, with backend selection.

Owns the argument checks (the backend rule is pallas_kernels/backends.py's, as for every op); gpu.py and tpu.py hold the launch
parameters, kernel.py the body, reference.py the arithmetic. The 'xla' backend is the
reference itself (what `efficient_train.optim` runs where no kernel applies), so every
backend computes the same function; in interpret mode the kernels match it bit for bit.
"""
from __future__ import annotations

import jax

from pallas_kernels.backends import resolve_backend
from pallas_kernels.fused_adamw import gpu, reference, tpu
from pallas_kernels.fused_adamw.reference import Blocks, Code, Hyper, Scalars


def fused_adamw(
    g: jax.Array,
    p: jax.Array,
    m: Blocks,
    v: Blocks,
    scalars: Scalars,
    *,
    m_code: Code,
    v_code: Code,
    hyper: Hyper,
    emit_params: bool = True,
    backend: str = "auto",
    interpret: bool = False,
    rows: int | None = None,
) -> tuple[jax.Array, Blocks, Blocks]:
    """AdamW on N blocks of B elements: g, p (N, B) float32; m, v their quantized moments
    (codes (N, B) or (N, B/2) uint8, scales and exponents (N, 1) float32).

    Returns (p + update if emit_params else the update, new m, new sqrt(v) blocks).
    """
    if g.ndim != 2 or g.shape != p.shape:
        raise ValueError(f"g and p must be (blocks, block_size) arrays of one shape, got {g.shape} and {p.shape}")
    backend = resolve_backend(backend, interpret)
    if backend == "xla":
        out, new_m, new_v = reference.adamw_blocks(
            reference.split(g, m_code), reference.split(p, m_code), m, v, m_code, v_code, hyper, scalars, emit_params
        )
        return reference.join(out), new_m, new_v
    launch = gpu.call if backend == "triton" else tpu.call
    return launch(g, p, m, v, scalars, m_code=m_code, v_code=v_code, hyper=hyper, emit_params=emit_params, rows=rows,
                  interpret=interpret)
