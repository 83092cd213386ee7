"""Checkpoints: bit-exact resume, restore onto other meshes and stages, retention,
crash leftovers, damage detection with fallback, and refusals (signals: test_run_safety.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from efficient_train import Hook, Trainer
from efficient_train.checkpoint import CheckpointError, leaf_paths, read_metadata
from efficient_train.checkpoint.metadata import metadata_path
from efficient_train.checkpoint.verify import verify_step
from tests.support.damage import array_files, flip_a_byte
from tests.support.subprocess_env import subprocess_env
from tests.support.zero_setup import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(workdir, **overrides):
    config = small_config(**{"mesh.data": 8, "zero_stage": 3, "train.log_every": 1, **overrides})
    config.workdir = str(workdir)
    return config


def _fit_losses(config) -> tuple[dict, Trainer]:
    losses = {}
    trainer = Trainer(config, hooks=[Hook(every=1, fn=lambda t, step, record: losses.__setitem__(step, record["loss"]))])
    trainer.fit()
    return losses, trainer


def _host(tree):
    return [(path, np.asarray(jax.device_get(leaf))) for path, leaf in leaf_paths(tree)]


def test_resume_is_bit_exact_on_the_same_mesh(tmp_path):
    straight, reference = _fit_losses(_config(tmp_path / "a", **{"train.steps": 6, "checkpoint.every": 0}))

    def crash(trainer, step, record):
        raise KeyboardInterrupt("simulated crash after step 3")

    interrupted = _config(tmp_path / "b", **{"train.steps": 6, "checkpoint.every": 3})
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted, hooks=[Hook(every=3, fn=crash)]).fit()
    resumed_losses, resumed = _fit_losses(_config(tmp_path / "b", **{"train.steps": 6}))
    assert sorted(resumed_losses) == [4, 5, 6]
    assert [resumed_losses[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]  # bitwise
    for (path, a), (_, b) in zip(_host(reference.state), _host(resumed.state)):
        np.testing.assert_array_equal(a, b, err_msg=path)
    assert resumed.loader.state() == reference.loader.state()


@pytest.mark.parametrize(
    "target",
    [
        pytest.param({"mesh.data": 2, "mesh.replica": 4, "zero_stage": 1}, marks=pytest.mark.slow),
        pytest.param({"mesh.data": 4, "mesh.tensor": 2, "zero_stage": 2}, marks=pytest.mark.slow),
        {"mesh.data": 2, "mesh.sequence": 4, "zero_stage": 3},
    ],
    ids=["replica4xdata2", "data4xtensor2", "data2xseq4"],
)
def test_restore_on_another_mesh_is_byte_identical_and_saves_back_the_same(tmp_path, target):
    _, saved = _fit_losses(_config(tmp_path, **{"train.steps": 3}))
    saved_leaves = _host(saved.state)
    moved = Trainer(_config(tmp_path, **{"train.steps": 5, **target}))
    assert int(moved.state.step) == 3
    for (path, a), (_, b) in zip(saved_leaves, _host(moved.state)):
        np.testing.assert_array_equal(a, b, err_msg=path)
    # Save A -> restore on B -> save A': the two checkpoints hold the same bytes.
    moved.checkpointer.save(103, moved.state, model=moved._model_record(), mesh=dict(moved.mesh.shape),
                            zero_stage=moved.config.zero_stage, optimizer={}, data=None, seed=0)
    moved.checkpointer.wait()
    first, second = read_metadata(saved.checkpointer.step_dir(3)), read_metadata(moved.checkpointer.step_dir(103))
    assert {p: r.fingerprint for p, r in first.leaves.items()} == {p: r.fingerprint for p, r in second.leaves.items()}
    # Training continues on the new mesh from the restored state.
    moved.fit()
    assert int(moved.state.step) == 5


@pytest.mark.slow
def test_one_device_restore(tmp_path):
    _, saved = _fit_losses(_config(tmp_path, **{"train.steps": 3}))
    fingerprints = {p: r.fingerprint for p, r in read_metadata(saved.checkpointer.step_dir(3)).leaves.items()}
    script = (
        "import json, sys; from tests.support.zero_setup import small_config; from efficient_train import Trainer;"
        "from efficient_train.checkpoint import leaf_paths; from efficient_train.checkpoint.fingerprint import device_fingerprint;"
        f"c = small_config(**{{'mesh.data': 1, 'zero_stage': 0, 'train.steps': 4}}); c.workdir = {str(tmp_path)!r};"
        "t = Trainer(c); print(json.dumps({'step': int(t.state.step), 'fp': {p: device_fingerprint(x) for p, x in leaf_paths(t.state)}}))"
    )
    env = subprocess_env(devices=1)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    restored = json.loads(out.stdout.strip().splitlines()[-1])
    assert restored["step"] == 3 and restored["fp"] == fingerprints


@pytest.mark.slow
def test_offloaded_optimizer_state_saves_verifies_and_resumes_bit_exactly(tmp_path):
    """Optimizer states in pinned host memory are fingerprinted where they lie."""
    offload = {"optimizer.offload": True, "optimizer.state_format": "int8"}
    straight, _ = _fit_losses(_config(tmp_path / "a", **{"train.steps": 4, "checkpoint.every": 0}, **offload))
    _fit_losses(_config(tmp_path / "b", **{"train.steps": 2, "checkpoint.every": 2}, **offload))
    step_dir = os.path.join(tmp_path, "b", "checkpoints", "2")
    assert verify_step(step_dir) == []
    resumed, trainer = _fit_losses(_config(tmp_path / "b", **{"train.steps": 4}, **offload))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(trainer.state.opt_state)} == {"pinned_host"}
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]  # bitwise


def test_retention_keeps_newest_and_every_kth(tmp_path):
    _, trainer = _fit_losses(_config(tmp_path, **{"train.steps": 7, "checkpoint.every": 1, "checkpoint.keep": 2,
                                                  "checkpoint.keep_every": 3}))
    assert trainer.checkpointer.steps() == [3, 6, 7]


@pytest.mark.slow
def test_crash_leftover_is_ignored_and_cleaned(tmp_path):
    _, trainer = _fit_losses(_config(tmp_path, **{"train.steps": 2}))
    leftover = os.path.join(trainer.checkpointer.directory, "5.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(leftover, "state"))
    with open(os.path.join(leftover, "state", "partial"), "wb") as f:
        f.write(b"half written")
    resumed = Trainer(_config(tmp_path, **{"train.steps": 4}))
    assert int(resumed.state.step) == 2 and resumed.checkpointer.steps() == [2]
    assert not os.path.exists(leftover)


@pytest.fixture(scope="module")
def two_steps_saved(tmp_path_factory) -> str:
    """A work directory whose checkpoints hold steps 1 and 2; tests damage copies of it."""
    workdir = tmp_path_factory.mktemp("two_steps")
    _, trainer = _fit_losses(_config(workdir, **{"train.steps": 2, "checkpoint.every": 1}))
    assert trainer.checkpointer.steps() == [1, 2]
    return str(workdir)


def _copy(workdir: str, tmp_path) -> tuple[str, str]:
    shutil.copytree(workdir, tmp_path / "run")
    return str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("damage", ["flip_bit", "truncate", "delete_data", "delete_metadata"])
def test_damage_is_detected_and_restore_falls_back(tmp_path, damage, capsys, two_steps_saved):
    workdir, checkpoints = _copy(two_steps_saved, tmp_path)
    step_dir = os.path.join(checkpoints, "2")
    largest = max(array_files(step_dir), key=os.path.getsize)
    if damage == "flip_bit":
        flip_a_byte(step_dir)
    elif damage == "truncate":
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif damage == "delete_data":
        os.remove(largest)
    else:
        os.remove(metadata_path(step_dir))
    resumed = Trainer(_config(workdir, **{"train.steps": 3}))
    assert int(resumed.state.step) == 1
    warning = [line for line in capsys.readouterr().out.splitlines() if "checkpoint damaged" in line]
    assert len(warning) == 1
    if damage == "delete_metadata":
        assert "metadata.json" in warning[0]
    else:  # the damaged leaf is named
        assert re.search(r"step 2: damaged leaves.*(params|opt_state)/", warning[0]), warning[0]


def test_newer_format_and_other_model_are_refused(tmp_path, two_steps_saved):
    workdir, checkpoints = _copy(two_steps_saved, tmp_path)
    with pytest.raises(CheckpointError, match=r"model config does not match the checkpoint \(hidden_size: saved 64"):
        Trainer(_config(workdir, **{"model.hidden_size": 32, "model.intermediate_size": 64}))
    path = metadata_path(os.path.join(checkpoints, "2"))
    raw = json.load(open(path))
    raw["format_version"] = 99
    json.dump(raw, open(path, "w"))
    with pytest.raises(CheckpointError, match="format_version 99 is newer"):
        Trainer(_config(workdir))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efficient_train.cli", "checkpoint", *args], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_inspect_and_verify_commands(tmp_path, two_steps_saved):
    _, checkpoints = _copy(two_steps_saved, tmp_path)
    inspected = _cli("inspect", checkpoints)  # a checkpoint directory: its newest step
    assert inspected.returncode == 0 and "step 2, format version 1" in inspected.stdout
    assert re.search(r"params/embed/embedding\s+\[256, 64\]\s+float32\s+65,536", inspected.stdout)
    assert _cli("verify", os.path.join(checkpoints, "2")).returncode == 0
    flip_a_byte(os.path.join(checkpoints, "2"), mask=0x01, where=1 / 3)
    verified = _cli("verify", checkpoints)
    assert verified.returncode == 1 and "DAMAGED: step 2" in verified.stdout
    assert re.search(r"^  (params|opt_state)/\S+: (fingerprint mismatch|unreadable)", verified.stdout, re.M)
    missing = _cli("verify", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: CKPT:")
