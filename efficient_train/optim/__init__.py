"""Optimizers and schedules: `adamw` (an optax GradientTransformation, with fp32, bf16,
int8, fp8 or int4 states), the state's placement and conversions, `make_schedule`.

Modules: choices (allowed values, no imports), optimizer (`adamw`, the entry point, and masks),
compressed (the compressed transformation), quant (quantize/dequantize per format),
codes (the code maps as literal tables), placement (state shardings, host offload),
convert (fp32 <-> compressed, JSON description), schedules. The names below are
imported on first use (efficient_train/lazy.py), so `choices` loads without jax.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_train.lazy import lazy_attributes

__all__ = [
    "CompressedAdamState", "Quantized", "adamw", "apply_updates", "decay_mask", "describe_state", "device_shardings",
    "from_fp32", "is_offloaded", "make_schedule", "quantize_mask", "state_shardings", "to_fp32",
]
__getattr__, __dir__ = lazy_attributes(__name__, {
    **dict.fromkeys(["adamw", "apply_updates", "decay_mask", "quantize_mask"], "efficient_train.optim.optimizer"),
    "CompressedAdamState": "efficient_train.optim.compressed",
    **dict.fromkeys(["describe_state", "from_fp32", "to_fp32"], "efficient_train.optim.convert"),
    **dict.fromkeys(["device_shardings", "is_offloaded", "state_shardings"], "efficient_train.optim.placement"),
    "Quantized": "efficient_train.optim.quant",
    "make_schedule": "efficient_train.optim.schedules",
})

if TYPE_CHECKING:
    from efficient_train.optim.compressed import CompressedAdamState
    from efficient_train.optim.convert import describe_state, from_fp32, to_fp32
    from efficient_train.optim.optimizer import adamw, apply_updates, decay_mask, quantize_mask
    from efficient_train.optim.placement import device_shardings, is_offloaded, state_shardings
    from efficient_train.optim.quant import Quantized
    from efficient_train.optim.schedules import make_schedule
