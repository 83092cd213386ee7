"""Fused AdamW on block-quantized optimizer states: dequantize, update and requantize in
one pass (Pallas: Triton on GPU, Mosaic on TPU), with the plain-JAX reference that the
XLA path of `efficient_train.optim` shares; see api.fused_adamw."""
from pallas_kernels.backends import BACKENDS, resolve_backend
from pallas_kernels.fused_adamw.api import fused_adamw
from pallas_kernels.fused_adamw.reference import Blocks, Code, Hyper, Scalars

__all__ = ["BACKENDS", "Blocks", "Code", "Hyper", "Scalars", "fused_adamw", "resolve_backend"]
