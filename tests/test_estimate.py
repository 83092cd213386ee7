"""`efficient-train estimate`: per-device memory of a config on a mesh larger than the
machine, from the compiled step, without running it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.subprocess_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _estimate(*args: str) -> dict:
    env = subprocess_env()  # the command sizes the simulated devices from the mesh
    out = subprocess.run([sys.executable, "-m", "efficient_train.cli", "estimate", "--json", *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_llama_8b_zero3_on_8_devices_holds_an_eighth():
    from efficient_train.config import get_config
    from efficient_train.models import ModelConfig

    estimate = _estimate("--config", "configs/llama_8b.py", "--config.mesh.data=8")
    num_params = ModelConfig.from_config_dict(get_config(os.path.join(ROOT, "configs/llama_8b.py")).model).num_params()
    assert estimate["num_params"] == num_params and 8.0e9 < num_params < 8.1e9
    per_device = estimate["per_device_bytes"]
    assert per_device["params"] == num_params * 4 // 8  # fp32 master weights, every tensor split 8 ways
    # Adam's m and v split 8 ways, plus the optimizer's replicated int32 step counters.
    assert 0 < per_device["opt_state"] - 2 * num_params * 4 // 8 <= 16
    assert per_device["temp"] > 0 and per_device["total"] > per_device["params"] + per_device["opt_state"]


@pytest.mark.slow
def test_stage_and_mesh_change_the_estimate():
    small = ["--config.model.num_layers=2", "--config.data.seq_len=64"]
    zero0 = _estimate("--config.mesh.data=4", "--config.zero_stage=0", *small)
    zero3 = _estimate("--config.mesh.data=4", "--config.zero_stage=3", *small)
    tensor = _estimate("--config.mesh.data=2", "--config.mesh.tensor=2", "--config.zero_stage=0", *small)
    assert zero0["mesh"]["data"] == 4 and zero0["per_device_bytes"]["params"] == 4 * zero3["per_device_bytes"]["params"]
    assert tensor["per_device_bytes"]["params"] < zero0["per_device_bytes"]["params"]


def test_a_step_too_large_to_compile_is_one_line_not_an_xla_abort():
    """batch_size 2**40 used to crash XLA's heap simulator (a C++ check failure, no Python error)."""
    from efficient_train.config import ConfigError, default_config
    from efficient_train.train.estimate import estimate_memory

    config = default_config()
    config.train.batch_size = 2**40
    try:
        estimate_memory(config)
    except ConfigError as error:
        assert str(error).startswith("train.batch_size x data.seq_len: 1099511627776 x 128"), error
    else:
        raise AssertionError("estimate_memory accepted a batch of 2**40 rows")


@pytest.mark.slow
def test_lora_llama3_8b_saves_the_base_optimizer_state_and_gradients_on_one_device():
    """configs/lora_llama3_8b.py against the same run as a full fine-tune (bf16 weights both): the
    LoRA step holds the bf16 base plus fp32 adapters, Adam states of the adapters only, and its
    total is below the full fine-tune's by at least the base's optimizer state and gradient."""
    lora = _estimate("--config", "configs/lora_llama3_8b.py")
    full = _estimate("--config", "configs/lora_llama3_8b.py", "--config.finetune.lora.rank=0",
                     "--config.finetune.base=")
    base, adapters = full["num_params"], lora["num_params"] - full["num_params"]
    in_out = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096), "gate": (4096, 14336),
              "up": (4096, 14336), "down": (14336, 4096)}
    assert adapters == 32 * 16 * sum(n_in + n_out for n_in, n_out in in_out.values())  # rank-16 A and B per layer
    ours, theirs = lora["per_device_bytes"], full["per_device_bytes"]
    assert ours["params"] == theirs["params"] + 4 * adapters == 2 * base + 4 * adapters
    counters = ours["opt_state"] - 2 * 4 * adapters
    assert 0 < counters <= 16 and theirs["opt_state"] == 2 * 2 * base + counters  # bf16 moments of every weight
    base_optimizer_and_gradients = (theirs["opt_state"] - ours["opt_state"]) + 2 * base
    assert theirs["total"] - ours["total"] >= base_optimizer_and_gradients


def test_remat_list_is_checked_before_jax_starts():
    out = subprocess.run([sys.executable, "-m", "efficient_train.cli", "estimate", "--remat", "save_dots,save_all"],
                         capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --remat: 'save_dots,save_all'"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_policy_table_models_offload_from_full_and_its_twin():
    small = ["--config.model.num_layers=4", "--config.data.seq_len=64", "--config.mesh.data=1"]
    rows = {row["policy"]: row for row in _estimate("--remat", "save_qkv,full,offload_qkv", *small)}
    assert list(rows) == ["save_qkv", "full", "offload_qkv"]
    offload, full, twin = (rows[p]["per_device_bytes"] for p in ("offload_qkv", "full", "save_qkv"))
    assert rows["offload_qkv"]["modeled"] and not rows["save_qkv"]["modeled"]
    assert offload == full and twin["temp"] > full["temp"]
    assert rows["offload_qkv"]["host_bytes"] == twin["temp"] - full["temp"]
