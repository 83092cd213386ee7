"""The environment of the processes that tests start.

It is the test run's own (conftest.py: the CPU platform, the shared compilation cache,
the compile flags) with the simulated device count set to `devices`, or left out for a
command that sizes the devices itself (`--devices`, or from the mesh), and this
interpreter's scripts first on PATH (`scripts/launch_local.sh` runs `efficient-train`).
"""
from __future__ import annotations

import os
import sys

from efficient_train.cli import with_device_count


def subprocess_env(devices: int | None = None) -> dict[str, str]:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), devices),
                PATH=path)
