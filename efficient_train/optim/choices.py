"""The optimizer's allowed values: state formats, block sizes, kernels, schedules. Plain names, no imports.

The optimizer modules check against these (quant.py: formats and block sizes;
adamw.py: kernels; schedules.py: schedules) and `config.validate` refuses the same
values by field name before jax starts, so they live in a module that loads nothing.
"""
from __future__ import annotations

STATE_FORMATS = ("fp32", "bf16", "int8", "fp8", "int4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # powers of two; the smallest is the last fallback
OPTIMIZER_KERNELS = ("auto", "xla", "pallas")
SCHEDULES = ("cosine", "linear", "constant")
