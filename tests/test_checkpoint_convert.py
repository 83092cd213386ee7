"""`checkpoint convert`: re-layout for another mesh, state-format re-encoding, params-only
and bf16 outputs, all-problems-first refusal, the CLI, and bounded host memory."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from efficient_train import Trainer
from efficient_train.checkpoint import Checkpointer, CheckpointError, leaf_paths, read_metadata
from efficient_train.checkpoint.storage import _spec, read_leaf
from efficient_train.config import parse_mesh_flag
from efficient_train.optim.convert import from_fp32, to_fp32
from efficient_train.parallel.mesh import make_mesh
from efficient_train.tools.convert import convert
from efficient_train.train.training_setup import build_setup
from tests.support.damage import flip_a_byte
from tests.support.subprocess_env import subprocess_env
from tests.support.zero_setup import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = {"mesh.data": 8, "zero_stage": 3, "optimizer.state_format": "int8", "optimizer.min_quantized_size": 256}


def _config(workdir, checkpoint_dir=None, **overrides):
    config = small_config(**{**SOURCE, "train.steps": 3, **overrides})
    config.workdir = str(workdir)
    if checkpoint_dir is not None:
        config.checkpoint.dir = str(checkpoint_dir)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, Trainer]:
    """int8 states, ZeRO-3 over data=8, saved at step 3."""
    workdir = tmp_path_factory.mktemp("source")
    trainer = Trainer(_config(workdir))
    trainer.fit()
    return os.path.join(workdir, "checkpoints"), trainer


def _host(tree) -> dict[str, np.ndarray]:
    return {path: np.asarray(jax.device_get(leaf)) for path, leaf in leaf_paths(tree)}


@pytest.mark.slow
def test_same_format_on_another_mesh_is_byte_identical_and_chunked_per_shard(tmp_path, trained):
    source, trainer = trained
    step_dir = convert(source, str(tmp_path / "dst"), mesh=parse_mesh_flag("data=4,tensor=2"), zero_stage=2)
    saved, written = read_metadata(os.path.join(source, "3")), read_metadata(step_dir)
    assert written.leaves == saved.leaves and written.mesh["tensor"] == 2 and written.zero_stage == 2
    for name in saved.leaves:
        np.testing.assert_array_equal(read_leaf(step_dir, name), read_leaf(os.path.join(source, "3"), name), err_msg=name)
    # Laid out for the target: the q kernel (layers, embed, heads, head_dim) is split over heads by tensor=2 and is
    # whole over data at stage 2; its chunks tile those shards (Orbax splits a replicated shard among its replicas),
    # where the source's chunks (ZeRO-3 over data=8 splits embed) hold all 4 heads.
    def chunks(directory):
        return tuple(ts.open(_spec(directory, "params/blocks/attn/q/kernel")).result().chunk_layout.read_chunk.shape)

    target_shard = (2, 64, 2, 16)
    assert all(extent % chunk == 0 for extent, chunk in zip(target_shard, chunks(step_dir)))
    assert chunks(os.path.join(source, "3")) == (2, 8, 4, 16)

    resumed = Trainer(_config(tmp_path, tmp_path / "dst", **{"mesh.data": 4, "mesh.tensor": 2, "zero_stage": 2,
                                                              "train.steps": 5}))
    assert int(resumed.state.step) == 3
    reference = _host(trainer.state)
    for name, value in _host(resumed.state).items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)
    resumed.fit()
    assert resumed.checkpointer.steps() == [3, 5]


def _restore(directory, **overrides):
    """Restore a converted step onto a program of `overrides` (abstract: nothing is compiled)."""
    config = _config(directory, directory, **overrides)
    setup = build_setup(config, make_mesh(dict(config.mesh)))
    checkpointer = Checkpointer(str(directory), keep=1, keep_every=0, async_save=False)
    state, _ = checkpointer.restore_step(3, setup.abstract_state, model=setup.model_config.record())
    return state, setup


@pytest.mark.slow
def test_int8_to_fp32_and_back_decode_and_encode_exactly_and_training_continues(tmp_path, trained):
    source, trainer = trained
    convert(source, str(tmp_path / "fp32"), mesh=parse_mesh_flag("data=8"), state_format="fp32")
    resumed = Trainer(_config(tmp_path, tmp_path / "fp32", **{"optimizer.state_format": "fp32", "train.steps": 5}))
    decoded, restored = to_fp32(trainer.state.opt_state), to_fp32(resumed.state.opt_state)
    assert int(restored.count) == int(decoded.count) == 3
    for moment in ("mu", "nu"):
        for (name, a), (_, b) in zip(leaf_paths(getattr(decoded, moment)), leaf_paths(getattr(restored, moment))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{moment}/{name}")

    # fp32 -> int8 on another mesh equals encoding those fp32 moments in memory.
    convert(str(tmp_path / "fp32"), str(tmp_path / "int8"), mesh=parse_mesh_flag("data=2,tensor=4"), state_format="int8")
    int8, setup = _restore(tmp_path / "int8", **{"mesh.data": 2, "mesh.tensor": 4})
    expected = from_fp32(restored, setup.step_def.optimizer, resumed.state.params)
    for (name, a), (_, b) in zip(leaf_paths(expected), leaf_paths(int8.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)

    first = float(resumed.step()["loss"])
    assert float(resumed.step()["loss"]) < first  # the decoded moments keep the descent going


@pytest.mark.slow
def test_params_only_trains_with_a_fresh_optimizer(tmp_path, trained):
    source, trainer = trained
    step_dir = convert(source, str(tmp_path / "dst"), mesh=parse_mesh_flag("data=8"), drop_optimizer=True)
    metadata = read_metadata(step_dir)
    assert metadata.optimizer is None and not [name for name in metadata.leaves if name.startswith("opt_state")]
    resumed = Trainer(_config(tmp_path, tmp_path / "dst", **{"train.steps": 5}))
    assert int(resumed.state.step) == 3 and int(to_fp32(resumed.state.opt_state).count) == 0
    reference = _host(trainer.state.params)
    for name, value in _host(resumed.state.params).items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)
    assert np.isfinite(resumed.fit()["loss"])


def test_bf16_params_restore_as_the_cast_of_the_source(tmp_path, trained):
    source, trainer = trained
    step_dir = convert(source, str(tmp_path / "dst"), mesh=parse_mesh_flag("data=8"), drop_optimizer=True,
                       dtype="bfloat16")
    assert read_metadata(step_dir).model["param_dtype"] == "bfloat16"
    restored, _ = _restore(tmp_path / "dst", **{"model.param_dtype": "bfloat16"})
    reference = _host(trainer.state.params)
    for name, value in _host(restored.params).items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, reference[name].astype(jnp.bfloat16), err_msg=name)


def test_every_problem_is_reported_before_anything_is_written(tmp_path, trained):
    source, _ = trained
    with pytest.raises(CheckpointError) as error:
        convert(source, str(tmp_path / "dst"), mesh=parse_mesh_flag("tensor=3"), state_format="int7", dtype="fp16")
    message = str(error.value)
    for expected in ("--state_format: 'int7'", "--dtype: 'fp16'", "params/blocks/attn/q/kernel", "('heads' = 4) is not divisible by tensor = 3",
                     "params/blocks/mlp/up/kernel", "('mlp' = 128) is not divisible by tensor = 3"):
        assert expected in message
    assert "kv_heads" not in message  # kv heads stay whole, as in training
    assert "\n" not in message and not os.path.exists(tmp_path / "dst")


def test_a_damaged_source_is_refused_naming_what_verify_names_and_nothing_is_written(tmp_path, trained):
    """Re-encoding reads every moment; each leaf is checked as it is read, so the damage
    is found, never laundered into a DST that verifies clean."""
    import shutil

    from efficient_train.checkpoint import DamagedCheckpoint
    from efficient_train.checkpoint.verify import verify_step

    source, _ = trained
    shutil.copytree(source, tmp_path / "src")
    step_dir = str(tmp_path / "src" / "3")
    flip_a_byte(step_dir, mask=0x04)
    damaged = sorted(problem.leaf for problem in verify_step(step_dir))
    assert damaged
    with pytest.raises(DamagedCheckpoint) as error:
        convert(str(tmp_path / "src"), str(tmp_path / "dst"), mesh=parse_mesh_flag("data=8"), state_format="fp32")
    message = str(error.value)
    assert message.startswith(f"SRC: step 3 ({step_dir}) is damaged, nothing was written to DST: ")
    named = sorted(part.split(": ")[0] for part in message.split("nothing was written to DST: ")[1].split("; "))
    assert named == damaged and "older steps" not in message and "\n" not in message
    assert not os.path.exists(tmp_path / "dst")


@pytest.mark.slow
def test_cli_convert_and_its_errors(tmp_path, trained):
    source, _ = trained
    env = subprocess_env()  # the command simulates the target mesh's devices itself

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "efficient_train.cli", "checkpoint", "convert", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True)

    done = cli(source, str(tmp_path / "dst"), "--mesh", "data=2,tensor=2", "--zero_stage", "1")
    assert done.returncode == 0, done.stderr
    metadata = read_metadata(os.path.join(tmp_path, "dst", "3"))
    assert metadata.mesh == {"replica": 1, "data": 2, "expert": 1, "sequence": 1, "tensor": 2}
    assert metadata.zero_stage == 1 and metadata.optimizer["state_format"] == "int8"
    again = cli(source, str(tmp_path / "dst"), "--mesh", "data=2,tensor=2")
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    bad = cli(source, str(tmp_path / "other"), "--mesh", "data=two")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --mesh: 'data=two'")
