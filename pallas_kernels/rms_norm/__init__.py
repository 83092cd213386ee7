"""Fused RMSNorm (forward and backward) as Pallas kernels for GPU (Triton) and TPU
(Mosaic), with a plain-JAX reference; see api.rms_norm."""
from pallas_kernels.backends import BACKENDS, resolve_backend
from pallas_kernels.rms_norm.api import rms_norm
from pallas_kernels.rms_norm.reference import rms_norm_reference

__all__ = ["BACKENDS", "resolve_backend", "rms_norm", "rms_norm_reference"]
