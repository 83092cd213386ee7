"""Per-device memory of a config's train step, from the compiler, without running it.

The step is lowered on abstract state and batch (ShapeDtypeStructs carrying their
shardings) over the current devices, usually simulated CPU devices as many as the
mesh needs, and compiled; nothing is allocated. Parameter and optimizer-state bytes
follow exactly from the shardings and hold on any backend. The temporary bytes are the
CPU compiler's schedule: GPU and TPU compilers fuse and schedule differently, so read
them as an estimate of activation memory, not a guarantee.

Before anything is lowered the config is validated, which bounds a step's size (a huge
batch used to abort XLA's heap simulator instead of raising), and a CPU device count
above `MAX_SIMULATED_DEVICES` is refused: the CPU backend cannot compile for more.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from efficient_train.config import MAX_SIMULATED_DEVICES, ConfigError, validate
from efficient_train.parallel.mesh import make_mesh
from efficient_train.train.memory import memory_record
from efficient_train.train.step import build_train_step, compiler_options
from efficient_train.train.training_setup import build_setup, lm_batch_shapes

GIB = 1024**3


def estimate_memory(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Per-device bytes of the config's compiled train step on the current devices."""
    if jax.default_backend() == "cpu" and jax.device_count() > MAX_SIMULATED_DEVICES:
        raise ConfigError(f"mesh: {jax.device_count()} CPU devices; the CPU backend compiles for at most "
                          f"{MAX_SIMULATED_DEVICES} simulated devices")
    mesh_shape = validate(config, jax.device_count(), check_paths=False)
    mesh = make_mesh(mesh_shape)
    setup = build_setup(config, mesh)
    batch = lm_batch_shapes(config)
    step = build_train_step(setup.step_def, setup.state_shardings, batch)
    compiled = step.lower(setup.abstract_state, setup.abstract_batch(batch)).compile(
        compiler_options=compiler_options(setup.step_def))
    return {
        "mesh": mesh_shape,
        "zero_stage": config.zero_stage,
        "num_params": setup.num_params,
        "per_device_bytes": memory_record(setup, compiled),
    }


def format_estimate(config: ml_collections.ConfigDict, estimate: dict[str, Any]) -> str:
    mesh = " x ".join(f"{axis}={size}" for axis, size in estimate["mesh"].items())
    per_device = estimate["per_device_bytes"]
    lines = [
        f"model: {estimate['num_params'] / 1e9:.3f}B parameters, mesh {mesh}, zero_stage {estimate['zero_stage']}, "
        f"optimizer states {config.optimizer.state_format}, batch {config.train.batch_size} x {config.data.seq_len}",
        "per-device memory (GiB):",
    ]
    for name in ("params", "opt_state", "temp", "total"):
        lines.append(f"  {name:<10} {per_device[name] / GIB:10.3f}")
    lines.append("(params and opt_state are exact; temp is the CPU compiler's schedule, an estimate for GPU/TPU)")
    return "\n".join(lines)
