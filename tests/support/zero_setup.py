"""A small model and run shared by the ZeRO / tensor-parallel equivalence tests.

Run as a script (`python -m tests.support.zero_setup N_DEVICES JSON_OVERRIDES`) it prints the
per-step losses of a run on N simulated devices; the tests use that for the
single-device reference, which needs a process of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from tests.support.subprocess_env import subprocess_env

STEPS = 5


def small_config(**overrides):
    from efficient_train import get_config

    c = get_config()
    c.model.update(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2)
    c.data.update(source="synthetic", seq_len=32)
    c.train.update(steps=STEPS, batch_size=16, warmup_steps=1, learning_rate=1e-2)
    c.workdir = tempfile.mkdtemp(prefix="efficient_train_test_")  # fresh: nothing to resume
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def run_losses(overrides: dict, steps: int = STEPS) -> tuple[list[float], object]:
    from efficient_train import Trainer

    trainer = Trainer(small_config(**overrides))
    losses = [float(trainer.step()["loss"]) for _ in range(steps)]
    return losses, trainer


def losses_in_subprocess(num_devices: int, overrides: dict) -> list[float]:
    env = subprocess_env(num_devices)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.zero_setup", json.dumps(overrides)],
        cwd=root, env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_losses(json.loads(sys.argv[1]))[0]))
