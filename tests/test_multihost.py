"""Multi-host: 2 processes x 4 devices (jax.distributed, gloo on 127.0.0.1) train and evaluate
to the same losses as 1 process x 8 devices, and only process 0 writes metrics and trackers."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support.subprocess_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--config.data.source=synthetic", "--config.data.seq_len=32", "--config.model.hidden_size=64",
    "--config.model.intermediate_size=128", "--config.model.num_layers=2", "--config.model.head_dim=16",
    "--config.train.steps=4", "--config.train.batch_size=16", "--config.train.log_every=1",
    "--config.mesh.data=8", "--config.zero_stage=3",
    f"--config.eval.sets=held=text:{os.path.join(ROOT, 'efficient_train', 'config.py')}", "--config.eval.every=2",
    "--config.eval.steps=2", "--config.tracker.tensorboard=true",
]
HAS_WANDB = importlib.util.find_spec("wandb") is not None
if HAS_WANDB:
    ARGS += ["--config.tracker.wandb.project=multihost", "--config.tracker.wandb.mode=offline"]


def _losses(workdir: str, key: str = "loss") -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [record[key] for record in map(json.loads, f) if key in record]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = subprocess_env()
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    subprocess.run([sys.executable, "-m", "efficient_train.cli", "train", "--devices", "8", "--workdir", single, *ARGS],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    result = subprocess.run(["bash", "scripts/launch_local.sh", "2", "--devices_per_process", "4", "--workdir", multi, *ARGS],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single_losses, multi_losses = _losses(single), _losses(multi)
    assert len(single_losses) == 4
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
    # Process 1 wrote no metrics of its own: one startup record, from process 0, naming 2 processes.
    records = [json.loads(line) for line in open(os.path.join(multi, "metrics.jsonl"))]
    startups = [r for r in records if r.get("event") == "startup"]
    assert len(startups) == 1 and startups[0]["processes"] == 2 and startups[0]["devices"] == 8
    # Evaluation: each process reads its own rows of the set; the sums over the mesh are the one process's.
    assert len(_losses(single, "eval/held/loss")) == 2
    np.testing.assert_allclose(_losses(multi, "eval/held/loss"), _losses(single, "eval/held/loss"), rtol=1e-5)
    # Trackers: one writer. The event files, read raw by TensorBoard's loader, hold each step's loss
    # once. (Two writers in the same second would write the same bytes to the same file name, so the
    # check that fails when process 1 writes too is W&B's: each writer is its own offline run.)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(multi, "tensorboard", "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                points.setdefault(value.tag, []).append(event.step)
    assert points["loss"] == [1, 2, 3, 4] and points["eval/held/loss"] == [2, 4]
    if HAS_WANDB:
        assert len(glob.glob(os.path.join(multi, "wandb", "offline-run-*"))) == 1
