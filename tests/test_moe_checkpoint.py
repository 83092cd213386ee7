"""Checkpoints of an MoE model hold the global expert tensors: a run saved on expert=4 resumes on
expert=2 and expert=1, and `checkpoint convert` lays it out for another expert count, byte-identically;
the run continues under the other grouped-matmul implementation."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from efficient_train import Trainer
from efficient_train.checkpoint import read_metadata
from efficient_train.checkpoint.storage import read_leaf
from efficient_train.config import parse_mesh_flag
from efficient_train.tools.convert import convert
from efficient_train.tree_paths import leaf_paths
from tests.support.zero_setup import small_config

MOE = {"model.num_experts": 4, "model.experts_per_token": 2, "model.moe_intermediate_size": 32,
       "train.steps": 2, "checkpoint.every": 2, "zero_stage": 3}


def _config(workdir, checkpoint_dir=None, **overrides):
    config = small_config(**{**MOE, **overrides})
    config.workdir = str(workdir)
    if checkpoint_dir is not None:
        config.checkpoint.dir = str(checkpoint_dir)
    return config


def _host(tree) -> dict[str, np.ndarray]:
    return {path: np.asarray(jax.device_get(leaf)) for path, leaf in leaf_paths(tree)}


@pytest.mark.slow
def test_saved_on_expert_4_restores_on_expert_2_and_1_and_converts_byte_identically(tmp_path):
    source = Trainer(_config(tmp_path / "source", **{"mesh.data": 2, "mesh.expert": 4}))
    source.fit()
    with open(tmp_path / "source" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [record for record in map(json.loads, f) if "loss" in record]
    assert {"moe/aux_loss", "moe/z_loss", "moe/dropped_fraction", "moe/max_load_ratio", "moe/layer1/max_load",
            "moe/layer1/mean_load"} <= set(steps[-1])
    saved = _host(source.state)
    gate = saved["params/blocks/mlp/experts/gate"]
    assert gate.shape == (2, 4, 64, 32)  # [layers, experts, embed, expert_mlp]: the global tensor
    checkpoints = tmp_path / "source" / "checkpoints"

    for mesh in ({"mesh.data": 4, "mesh.expert": 2}, {"mesh.data": 8, "mesh.expert": 1}):
        resumed = Trainer(_config(tmp_path / f"resume_{mesh['mesh.expert']}", checkpoints, **mesh))
        assert int(resumed.state.step) == 2
        for name, value in _host(resumed.state).items():
            np.testing.assert_array_equal(value, saved[name], err_msg=f"{mesh}: {name}")
        expert_shard = resumed.state.params["blocks"]["mlp"]["experts"]["gate"].sharding.shard_shape(gate.shape)
        assert expert_shard[1] == 4 // mesh["mesh.expert"]

    step_dir = convert(str(checkpoints), str(tmp_path / "converted"), mesh=parse_mesh_flag("data=4,expert=2"),
                       zero_stage=1)
    written, original = read_metadata(step_dir), read_metadata(os.path.join(checkpoints, "2"))
    assert written.leaves == original.leaves and written.mesh["expert"] == 2
    for name in original.leaves:
        np.testing.assert_array_equal(read_leaf(step_dir, name), read_leaf(os.path.join(checkpoints, "2"), name),
                                      err_msg=name)

    # moe.impl says how to compute, not what is stored: the run continues under the Pallas kernel and saves.
    continued = Trainer(_config(tmp_path / "continued", checkpoints,
                                **{"mesh.data": 2, "mesh.expert": 4, "moe.impl": "pallas", "train.steps": 4}))
    assert int(continued.state.step) == 2
    assert np.isfinite(continued.fit()["loss"]) and read_metadata(os.path.join(checkpoints, "4")).step == 4
