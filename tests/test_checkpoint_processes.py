"""Checkpoints across process boundaries: SIGKILL at random moments during async saves
never leaves a listed step that fails to verify, and a checkpoint saved by 2 processes
x 4 devices restores byte-identically on 1 process x 2 devices and on 2 x 4."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from efficient_train.checkpoint import Checkpointer, read_metadata
from efficient_train.checkpoint.verify import verify_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.source=synthetic", "--config.data.seq_len=32", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.num_layers=2", "--config.model.head_dim=16",
         "--config.train.batch_size=16", "--config.train.log_every=1"]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("XLA_FLAGS", None)
    return env


def _steps(workdir: str) -> list[int]:
    return Checkpointer(os.path.join(workdir, "checkpoints"), keep=0, keep_every=0, async_save=False).steps()


@pytest.mark.slow
def test_sigkill_during_async_saves_never_lists_a_broken_step(tmp_path):
    workdir = str(tmp_path)
    args = [sys.executable, "-m", "efficient_train.cli", "train", "--devices", "8", "--workdir", workdir, *SMALL,
            "--config.train.steps=100000", "--config.checkpoint.every=1", "--config.checkpoint.keep=4",
            "--config.mesh.data=8", "--config.zero_stage=3"]
    rng = random.Random(0)
    metrics = os.path.join(workdir, "metrics.jsonl")
    kills, seen = 0, set()
    while kills < 24:
        lines_before = open(metrics).read().count("\n") if os.path.exists(metrics) else 0
        process = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not os.path.exists(metrics) or open(metrics).read().count("\n") <= lines_before + 1):
            time.sleep(0.05)  # wait until this process is stepping (and so saving every step)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        listed = _steps(workdir)
        for step in listed:
            problems = verify_step(os.path.join(workdir, "checkpoints", str(step)))
            assert not problems, (kills, step, problems)
        seen.update(listed)
    # The runs made progress across the kills, resuming each time from the newest step.
    assert max(seen) >= 24


@pytest.mark.slow
def test_saved_by_two_processes_restores_on_one_and_on_two(tmp_path):
    workdir = str(tmp_path)
    common = [*SMALL, "--config.train.steps=3", "--config.checkpoint.every=0"]
    saved = subprocess.run(["bash", "scripts/launch_local.sh", "2", "--devices_per_process", "4", "--workdir", workdir,
                            *common, "--config.mesh.data=8", "--config.zero_stage=3"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert saved.returncode == 0, saved.stdout[-2000:] + saved.stderr[-2000:]
    assert _steps(workdir) == [3]
    fingerprints = {leaf: r.fingerprint for leaf, r in read_metadata(os.path.join(workdir, "checkpoints", "3")).leaves.items()}

    script = (
        "import json, sys; from efficient_train.cli import _split_overrides; from efficient_train.config import apply_overrides;"
        "from efficient_train import Trainer, get_config; from efficient_train.checkpoint import leaf_paths;"
        "from efficient_train.checkpoint.fingerprint import device_fingerprint;"
        "c = get_config(); apply_overrides(c, _split_overrides(sys.argv[2:])); c.workdir = sys.argv[1];"
        "t = Trainer(c); print(json.dumps({'step': int(t.state.step), 'fp': {p: device_fingerprint(x) for p, x in leaf_paths(t.state)}}))"
    )
    env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    one = subprocess.run([sys.executable, "-c", script, workdir, *common, "--config.mesh.data=2", "--config.zero_stage=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    restored = json.loads(one.stdout.strip().splitlines()[-1])
    assert restored["step"] == 3 and restored["fp"] == fingerprints

    # Two processes again, continuing to step 5 from the restored state.
    resumed = subprocess.run(["bash", "scripts/launch_local.sh", "2", "--devices_per_process", "4", "--workdir", workdir,
                              *SMALL, "--config.train.steps=5", "--config.mesh.data=4", "--config.mesh.tensor=2",
                              "--config.zero_stage=2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and _steps(workdir)[-1] == 5
