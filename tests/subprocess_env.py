"""The environment of the processes that tests start.

It is the test run's own (conftest.py: the CPU platform, the shared compilation cache,
the compile flags) with the simulated device count set to `devices`, or left out for a
command that sizes the devices itself (`--devices`, or from the mesh), and this
interpreter's scripts first on PATH (`scripts/launch_local.sh` runs `efficient-train`).
"""
from __future__ import annotations

import os
import sys

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def subprocess_env(devices: int | None = None) -> dict[str, str]:
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if not flag.startswith(_DEVICE_COUNT_FLAG)]
    if devices is not None:
        flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PATH=path)
