"""Flash attention (forward and backward) as Pallas kernels for GPU (Triton) and TPU
(Mosaic), with a plain-JAX reference; see api.flash_attention."""
from pallas_kernels.backends import BACKENDS
from pallas_kernels.flash_attention.api import BlockSizes, flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["BACKENDS", "BlockSizes", "attention_reference", "flash_attention"]
