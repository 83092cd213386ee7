"""Checkpoints across process boundaries: SIGKILL at each phase of an async save never
leaves a listed step that fails to verify, a training run killed with SIGKILL
resumes bit-exactly, and a checkpoint saved by 2 processes x 4 devices restores
byte-identically on 1 process x 2 devices and on 2 x 4."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from efficient_train.checkpoint import Checkpointer, read_metadata
from efficient_train.checkpoint.manager import TRASH_DIR
from efficient_train.checkpoint.verify import verify_step
from tests.support.async_save_worker import KEEP, PHASES
from tests.support.subprocess_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.source=synthetic", "--config.data.seq_len=32", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.num_layers=2", "--config.model.head_dim=16",
         "--config.train.batch_size=16", "--config.train.log_every=1"]


def _steps_in(directory: str) -> list[int]:
    """The committed steps. (The Checkpointer made to list them removes Orbax's unfinished
    writes and empties the trash.)"""
    return Checkpointer(directory, keep=0, keep_every=0, async_save=False).steps()


def _steps(workdir: str) -> list[int]:
    return _steps_in(os.path.join(workdir, "checkpoints"))


def _unfinished_steps(directory: str) -> list[int]:
    """Steps whose write was cut short: Orbax's temporary directories ("7.orbax-checkpoint-tmp")."""
    return [int(name.split(".")[0]) for name in os.listdir(directory) if ".orbax-checkpoint-tmp" in name]


def _worker(directory: str, *args: str, output) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.support.async_save_worker", directory, *args], cwd=ROOT,
                            env=subprocess_env(devices=8), stdout=output, stderr=subprocess.STDOUT)


def _wait_for(signal_file, process: subprocess.Popen, output_file, timeout: float = 180) -> None:
    """Until the worker has written `signal_file` (it then blocks where it is); fails naming
    what the worker printed if it exits first or never gets there."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(signal_file):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"the worker never reached its hold ({signal_file.name}; a moved Orbax function?): "
                        f"{output_file.read_text()[-3000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_write_never_lists_a_broken_step(tmp_path):
    """A process saving asynchronously after every step (tests/support/async_save_worker.py) is
    killed with SIGKILL at each phase of a save in turn: the worker holds the save of
    step S = newest + 2 at the phase and signals, and only then is the kill sent, so every
    kill provably lands inside that save (for the trash, inside the deletion of a retired
    step). After each: the newest listed step is the newest committed one (S only if its
    rename happened), retention never dropped one of the newest KEEP, every listed step
    verifies, S's unfinished write is left behind (or the half-deleted step in the trash),
    and the next process resumes from the newest step, finding it bit for bit the state
    that step saved, and saves again. A last process carries on two more steps and ends."""
    directory = str(tmp_path / "checkpoints")
    trash = os.path.join(directory, TRASH_DIR)
    newest, trashed = 0, None
    for phase in PHASES:
        held = newest + 2  # newest + 1 is committed first: every process moves on
        signal_file, output_file = tmp_path / f"{phase}.reached", tmp_path / f"{phase}.out"
        with open(output_file, "w") as output:
            process = _worker(directory, "--hold", phase, "--at", str(held), "--signal", str(signal_file), output=output)
            _wait_for(signal_file, process, output_file)
            assert process.poll() is None  # held, not finished: the kill lands inside the save
            process.send_signal(signal.SIGKILL)
            process.wait()
        printed = output_file.read_text()
        assert printed.startswith(f"resumed {newest}\n"), (phase, printed[-3000:])
        reached, step, *detail = signal_file.read_text().split()
        assert reached == phase and (int(step) == held or phase == "trash" and int(step) > held), (phase, step)
        held = int(step)
        # What the kill left, looked at before a Checkpointer (which cleans both up) is made.
        if phase in ("arrays", "metadata", "item_commit", "step_commit"):
            assert _unfinished_steps(directory) == [held], phase  # the write the kill cut short
        if phase == "trash":  # a retired step, half deleted
            trashed = detail[0]
            assert int(trashed) < held - KEEP and trashed in os.listdir(trash)
        listed = _steps_in(directory)
        newest = held if phase == "committed" else held - 1
        assert listed[-1] == newest and set(range(max(1, newest - KEEP + 1), newest + 1)) <= set(listed), (phase, listed)
        for step in listed:
            assert verify_step(os.path.join(directory, str(step))) == [], (phase, step)
    last = subprocess.run([sys.executable, "-m", "tests.support.async_save_worker", directory, "--last", str(newest + 2)],
                          cwd=ROOT, env=subprocess_env(devices=8), capture_output=True, text=True, timeout=300, check=False)
    assert last.returncode == 0, last.stdout[-2000:] + last.stderr[-3000:]
    assert last.stdout.splitlines()[0] == f"resumed {newest}"  # restored, verified, and equal to the replay
    assert _steps_in(directory) == [newest + 1, newest + 2] and _unfinished_steps(directory) == []
    for step in (newest + 1, newest + 2):
        assert verify_step(os.path.join(directory, str(step))) == []
    assert trashed not in os.listdir(trash)  # the half-deleted step is gone


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_bit_exactly(tmp_path):
    """Per-step losses and the final state (every leaf's fingerprint) of a run killed with
    SIGKILL twice and resumed each time equal those of an uninterrupted run."""
    steps = 8
    args = [sys.executable, "-m", "efficient_train.cli", "train", "--devices", "8", *SMALL,
            f"--config.train.steps={steps}", "--config.checkpoint.every=1", "--config.mesh.data=8",
            "--config.zero_stage=3"]
    straight = str(tmp_path / "straight")
    subprocess.run([*args, "--workdir", straight], cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
    killed = str(tmp_path / "killed")
    for after_step in (2, 5):
        process = subprocess.Popen([*args, "--workdir", killed], cwd=ROOT, env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and max(_losses(killed), default=0) < after_step:
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it was killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert max(_losses(killed)) < steps, "the run finished before it could be killed"
    subprocess.run([*args, "--workdir", killed], cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
    assert _losses(killed) == _losses(straight)  # bitwise, every step, from whichever process ran it
    last = [read_metadata(os.path.join(w, "checkpoints", str(steps))) for w in (straight, killed)]
    assert {p: r.fingerprint for p, r in last[0].leaves.items()} == {p: r.fingerprint for p, r in last[1].leaves.items()}
    assert last[0].data == last[1].data  # the data loader's position


def _losses(workdir: str) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a step run twice (before and after a kill) must agree."""
    path = os.path.join(workdir, "metrics.jsonl")
    losses: dict[int, float] = {}
    if not os.path.exists(path):
        return losses
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                continue  # a record cut by the kill
            record = json.loads(line)
            if "step" in record and "loss" in record:
                assert losses.setdefault(record["step"], record["loss"]) == record["loss"], record
    return losses


@pytest.mark.slow
def test_saved_by_two_processes_restores_on_one_and_on_two(tmp_path):
    workdir = str(tmp_path)
    common = [*SMALL, "--config.train.steps=3", "--config.checkpoint.every=0"]
    saved = subprocess.run(["bash", "scripts/launch_local.sh", "2", "--devices_per_process", "4", "--workdir", workdir,
                            *common, "--config.mesh.data=8", "--config.zero_stage=3"],
                           cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
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
    env = subprocess_env(devices=2)
    one = subprocess.run([sys.executable, "-c", script, workdir, *common, "--config.mesh.data=2", "--config.zero_stage=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    restored = json.loads(one.stdout.strip().splitlines()[-1])
    assert restored["step"] == 3 and restored["fp"] == fingerprints

    # Two processes again, continuing to step 5 from the restored state.
    resumed = subprocess.run(["bash", "scripts/launch_local.sh", "2", "--devices_per_process", "4", "--workdir", workdir,
                              *SMALL, "--config.train.steps=5", "--config.mesh.data=4", "--config.mesh.tensor=2",
                              "--config.zero_stage=2"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and _steps(workdir)[-1] == 5


_FAILING_WRITE = """
import resource, signal, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from efficient_train.checkpoint import Checkpointer, CheckpointWriteError
mesh = jax.make_mesh((8,), ("data",))
state = {"w": jax.device_put(jnp.arange(1 << 20, dtype=jnp.float32), NamedSharding(mesh, P("data")))}
saving = dict(model={}, mesh={"data": 8}, zero_stage=3, optimizer={}, data=None, seed=0)
checkpointer = Checkpointer(sys.argv[1], keep=0, keep_every=0, async_save=True)
checkpointer.save(1, state, **saving)
checkpointer.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG) instead of killing us
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, hard))  # no file may grow past 256 KiB: the 4 MiB leaf's may not
checkpointer.save(2, state, **saving)
print("save 2 returned", flush=True)
try:
    checkpointer.save(3, state, **saving)
    print("save 3 returned")
except CheckpointWriteError as error:
    print("save 3 raised:", error)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("steps", checkpointer.steps())
checkpointer.save(4, state, **saving)
checkpointer.wait()
print("steps", checkpointer.steps())
"""


# Runs a command with files limited to 64 KiB, less than what the test model's save writes
# to one data file, and SIGXFSZ ignored (so a write past the limit fails with EFBIG); a
# shell sets both, where a preexec_fn would fork a threaded process.
_LIMITED = ["bash", "-c", "trap '' XFSZ; ulimit -f 64; exec \"$@\"", "limited"]


@pytest.mark.slow
def test_a_failed_background_write_surfaces_at_the_next_save(tmp_path):
    """A real write failure (files may not grow past 256 KiB: EFBIG from the kernel) in an
    async save: save() returns, the next save() raises naming the step, that step is never
    listed, the earlier step still verifies, and saving works again once the disk does."""
    directory = str(tmp_path / "checkpoints")
    env = subprocess_env(devices=8)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # its writes would meet the limit too
    run = subprocess.run([sys.executable, "-c", _FAILING_WRITE, directory], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "save 2 returned"
    assert lines[1].startswith("save 3 raised: step 2 was not saved, writing it failed (newest saved step: 1)"), lines
    assert "File too large" in lines[1]
    assert lines[2:] == ["steps [1]", "steps [1, 4]"]
    for step in (1, 4):
        assert verify_step(os.path.join(directory, str(step))) == []
    assert _steps_in(directory) == [1, 4]

    # The command line: the run stops with one error line naming the step, exit code 1.
    workdir = str(tmp_path / "train")
    train = subprocess.run([*_LIMITED, sys.executable, "-m", "efficient_train.cli", "train", "--devices", "8", "--workdir",
                            workdir, *SMALL, "--config.train.steps=4", "--config.checkpoint.every=2", "--config.mesh.data=8"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 1, train.stderr[-3000:]
    errors = [line for line in train.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step 2 was not saved, writing it failed"), train.stderr[-3000:]
    assert "File too large" in errors[0]
    # The console keeps our line; Orbax's and tensorstore's tracebacks of the failure go to the log it names.
    log = os.path.join(workdir, "logs", "process_0.log")
    assert errors[0].endswith(f"(library messages: {log})") and "Traceback" not in train.stderr
    assert "Traceback" in open(log).read()
    assert _steps(workdir) == []
