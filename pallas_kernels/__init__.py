"""Pallas kernels for efficient_train. Each op is one function with `backend=` ('auto',
'xla', 'triton', 'mosaic_tpu') and `interpret=` (run the kernel on CPU, for tests)."""
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.fused_adamw import fused_adamw
from pallas_kernels.rms_norm import rms_norm

__all__ = ["BlockSizes", "flash_attention", "fused_adamw", "rms_norm"]
