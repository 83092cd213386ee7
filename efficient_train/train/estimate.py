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

`estimate_policies` compiles the step once per remat policy, so a user can pick one
without a GPU. An offload policy cannot be measured on a CPU (its moves to host
compile as no-ops, so the CPU program is its save_* twin's); its row is modeled from
two compiles: device temp as `full` (nothing kept on the device across the layers),
and in host memory what the twin keeps beyond `full`.
"""
from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections

from efficient_train.config import MAX_SIMULATED_DEVICES, ConfigError, validate
from efficient_train.models.remat import DESCRIPTIONS, OFFLOADED_NAMES
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


def _with_remat(config: ml_collections.ConfigDict, policy: str) -> ml_collections.ConfigDict:
    other = copy.deepcopy(config)
    other.model.remat = policy
    return other


def _save_twin(policy: str) -> str:
    return policy.replace("offload_", "save_")


def estimate_policies(config: ml_collections.ConfigDict, policies: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per policy: its per-device bytes, and `host_bytes` (0 unless it offloads).

    Each policy is compiled at most once; an offload policy's row comes from `full` and
    its save_* twin (see the module docstring), marked `modeled`."""
    needed: list[str] = []
    for policy in policies:
        for name in ((_save_twin(policy), "full") if policy in OFFLOADED_NAMES else (policy,)):
            if name not in needed:
                needed.append(name)
    measured = {name: estimate_memory(_with_remat(config, name))["per_device_bytes"] for name in needed}
    rows = []
    for policy in policies:
        if policy in OFFLOADED_NAMES:
            full, twin = measured["full"], measured[_save_twin(policy)]
            rows.append({"policy": policy, "per_device_bytes": dict(full), "modeled": True,
                         "host_bytes": max(twin["temp"] - full["temp"], 0)})
        else:
            rows.append({"policy": policy, "per_device_bytes": measured[policy], "modeled": False, "host_bytes": 0})
    return rows


def format_policy_table(config: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"per-device memory by model.remat (GiB), batch {config.train.batch_size} x {config.data.seq_len}, "
        f"zero_stage {config.zero_stage}:",
        f"  {'policy':<18} {'params':>8} {'opt_state':>9} {'temp':>8} {'total':>8} {'host':>8}  keeps",
    ]
    for row in rows:
        b = row["per_device_bytes"]
        mark = "~" if row["modeled"] else " "
        lines.append(f"  {row['policy']:<18} {b['params'] / GIB:8.3f} {b['opt_state'] / GIB:9.3f} "
                     f"{b['temp'] / GIB:7.3f}{mark} {b['total'] / GIB:7.3f}{mark} {row['host_bytes'] / GIB:8.3f}  "
                     f"{DESCRIPTIONS[row['policy']]}")
    lines.append("(temp is the CPU compiler's schedule, an estimate for GPU/TPU; ~: an offload policy modeled as "
                 "full's device memory plus its save_* twin's kept activations in pinned host memory)")
    return "\n".join(lines)
