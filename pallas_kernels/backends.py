"""Which implementation a kernel runs: one rule shared by every `pallas_kernels.<op>` (flash attention, RMSNorm, fused AdamW).

Each op takes `backend=` ('auto', 'triton', 'mosaic_tpu', 'xla') and `interpret=`;
the choice is the same for all of them, so it lives here once: 'auto' means the Pallas
kernel of the platform (Triton on NVIDIA GPUs, Mosaic on TPUs) and the plain-JAX
reference elsewhere; `interpret=True` always runs a Pallas kernel in the interpreter.
"""
from __future__ import annotations

import jax

BACKENDS = ("auto", "triton", "mosaic_tpu", "xla")


def resolve_backend(backend: str, interpret: bool = False) -> str:
    """The concrete backend: 'auto' per platform, and the Pallas kernel interpret runs.

    An explicit 'triton' or 'mosaic_tpu' is taken as asked, whatever the platform, so
    that it can be lowered for another one (`.lower(lowering_platforms=('cuda',))`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not available; choose one of {', '.join(map(repr, BACKENDS))}")
    if interpret:
        if backend == "xla":
            raise ValueError("interpret=True runs a Pallas kernel; backend 'xla' has none")
        return "mosaic_tpu" if backend == "mosaic_tpu" else "triton"
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower():
        return "triton"
    return "mosaic_tpu" if platform == "tpu" else "xla"


def default_interpret() -> bool:
    """The `interpret=` callers pass when they want a Pallas kernel wherever they run: True
    on the CPU backend, which has no Pallas compiler, so the kernel runs in the interpreter."""
    return jax.default_backend() == "cpu"
