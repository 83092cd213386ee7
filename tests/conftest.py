"""Test set-up: 8 simulated CPU devices, set before jax is first imported, programs
compiled at LLVM's -O2 instead of XLA's default -O3, and one XLA compilation cache for
the whole run.

The tests' programs are small, so most of their time goes to compiling. At
`--xla_backend_optimization_level=2` XLA builds the same HLO programs (same
partitioning, collectives and buffer assignment, which the tests read) and LLVM skips
its costliest passes: a small trainer builds in 6-7 s instead of 10-12 s, and the
compute-bound optimizer runs (tests/test_optim_training.py) were faster too (65 s
against 75 s; at -O0 they took 88 s). Numerics do not depend on the level (IEEE
arithmetic, no fast math): a run of the suite at -O0 whose single-device reference runs
kept the default level passed, their losses equal within 2e-5.

A test that needs another device count (or several processes) runs in a subprocess.
The suite builds the same small trainer dozens of times, in both pytest workers and in
the processes tests start; they all inherit this environment, so after the first
build a compile is a cache read. The cache lives in a fresh directory per run (made by
the first process to load this file, pytest's controller), removed at the end.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=2"
).strip()  # processes that tests start keep the flags (tests/support/subprocess_env.py)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="efficient_train_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

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


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
