"""Test set-up: 8 simulated CPU devices, set before jax is first imported.

A test that needs another device count (or several processes) runs in a subprocess.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The slowest files first (multi-process runs, single-device reference subprocesses,
# training loops): with `--dist loadfile` the suite ends when its last file does, so a
# long file started last leaves the other worker idle.
SLOW_FILES_FIRST = (
    "test_checkpoint.py", "test_checkpoint_processes.py", "test_zero.py", "test_optim_sharding.py",
    "test_checkpoint_convert.py", "test_sequence_parallel.py", "test_optim_training.py", "test_flash_attention.py",
    "test_rms_norm.py", "test_multihost.py", "test_model.py", "test_trainer.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
