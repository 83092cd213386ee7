"""Optimizers and schedules: `adamw` (an optax GradientTransformation, with fp32, bf16,
int8, fp8 or int4 states), the state's placement and conversions, `make_schedule`.

Modules: adamw (the entry point and masks), compressed (the compressed transformation),
quant (quantize/dequantize per format), codes (the code maps as literal tables),
placement (state shardings, host offload), convert (fp32 <-> compressed, JSON
description), schedules."""
from efficient_train.optim import quant
from efficient_train.optim.adamw import adamw, apply_updates, decay_mask, quantize_mask
from efficient_train.optim.compressed import CompressedAdamState
from efficient_train.optim.convert import describe, from_fp32, to_fp32
from efficient_train.optim.placement import (
    device_shardings,
    is_offloaded,
    state_shardings,
)
from efficient_train.optim.quant import Quantized
from efficient_train.optim.schedules import make_schedule

__all__ = [
    "CompressedAdamState", "Quantized", "adamw", "apply_updates", "decay_mask", "describe", "device_shardings",
    "from_fp32", "is_offloaded", "make_schedule", "quant", "quantize_mask", "state_shardings", "to_fp32",
]
