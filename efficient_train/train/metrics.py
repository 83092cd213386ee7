"""Throughput, model FLOPs utilization, and the metrics file.

MFU = achieved model FLOP/s per device / the device's published dense bf16 peak.
Model FLOPs per token are the model's own count (`ModelConfig.flops_per_token`:
6 x matmul parameters for forward and backward, plus attention's
12 x layers x heads x head_dim x seq_len, halved when causal); for a user model
without such a count, 6 x parameters. Rematerialized recomputation is not counted
(that is what makes it *model* FLOPs). On a device without a peak in the table
(the CPU) MFU is null.

Only process 0 writes `<workdir>/metrics.jsonl`; every record is one JSON line, appended
whole or, if a write fails (a full disk), cut back to the last whole line before the
error is raised, so a reader never meets half a record.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from efficient_train.errors import RunError

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


class MetricsWriteError(RunError):
    """`metrics.jsonl` could not be written; the file still ends with a whole line."""


class MetricsWriter:
    """Appends JSON records to `<workdir>/metrics.jsonl` on process 0; a no-op elsewhere."""

    def __init__(self, workdir: str, enabled: bool) -> None:
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._fd: int | None = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = (json.dumps(record) + "\n").encode()
        whole = os.fstat(self._fd).st_size
        try:
            written = 0
            while written < len(line):  # a short write is followed by one that names the cause
                written += os.write(self._fd, line[written:])
        except OSError as error:
            try:
                os.ftruncate(self._fd, whole)
            except OSError:
                pass
            raise MetricsWriteError(f"metrics: writing {self.path} failed ({error}); the run stops, "
                                    "the file keeps its whole lines") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
