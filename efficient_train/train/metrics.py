"""Throughput, model FLOPs utilization, and the metrics file.

MFU = achieved model FLOP/s per device / the device's published dense bf16 peak.
Model FLOPs per token are the model's own count (`ModelConfig.flops_per_token`:
6 x matmul parameters for forward and backward, plus attention's
12 x layers x heads x head_dim x seq_len, halved when causal); for a user model
without such a count, 6 x parameters. Rematerialized recomputation is not counted
(that is what makes it *model* FLOPs). On a device without a peak in the table
(the CPU) MFU is null.

Only process 0 writes `<workdir>/metrics.jsonl`; every record is one JSON line.
"""
from __future__ import annotations

import json
import os
from typing import Any, TextIO

import jax

# Dense bf16 peak TFLOP/s per device, from the vendors' datasheets.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe part is 756
    "A100": 312.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def peak_tflops(device: jax.Device) -> float | None:
    kind = device.device_kind
    if "H100" in kind and "PCIe" in kind:
        return 756.0
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def throughput(
    *, tokens_per_step: float, step_time_s: float, flops_per_token: float, num_devices: int, peak: float | None
) -> dict[str, float | None]:
    tokens_per_sec = tokens_per_step / step_time_s
    tflops_per_device = tokens_per_sec * flops_per_token / num_devices / 1e12
    return {
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_per_device": tokens_per_sec / num_devices,
        "step_time_s": step_time_s,
        "model_tflops_per_device": tflops_per_device,
        "mfu": None if peak is None else tflops_per_device / peak,
    }


class MetricsWriter:
    """Appends JSON records to `<workdir>/metrics.jsonl` on process 0; a no-op elsewhere."""

    def __init__(self, workdir: str, enabled: bool) -> None:
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file: TextIO | None = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
