"""A run never loses or launders data: damaged steps, errors that are not damage, the
retention directory, the work-directory lock, non-finite states, the end of the data,
Ctrl-C, and the metrics file on a full disk. Each case continues (or reruns) afterwards
and saves again where that is the promise."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from efficient_train import Trainer, cli, get_config
from efficient_train.checkpoint import Checkpointer, CheckpointError, DamagedCheckpoint
from efficient_train.checkpoint.lock import LOCK_FILE, DirectoryInUse
from efficient_train.checkpoint.manager import NoVerifiedCheckpoint
from efficient_train.checkpoint.metadata import CheckpointReadError
from efficient_train.checkpoint.verify import verify_step
from efficient_train.errors import InputError
from efficient_train.train.trainer import Hook, NonFiniteState
from tests.support.damage import flip_a_byte
from tests.support.subprocess_env import subprocess_env
from tests.support.zero_setup import small_config
from tests.test_trainer import MLP, classification_batches, classification_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.source=synthetic", "--config.data.seq_len=32", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.num_layers=2", "--config.model.head_dim=16"]


def _config(workdir, **overrides):
    config = small_config(**{"mesh.data": 8, "zero_stage": 1, "train.log_every": 1, **overrides})
    config.workdir = str(workdir)
    return config


def tree_hash(directory: str) -> str:
    """Names, kinds and bytes of everything under `directory` (links not followed), but for
    the lock file, which each run rewrites with its own process id."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(set(dirs + files) - {LOCK_FILE}):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            if os.path.islink(path):
                digest.update(b"link:" + os.readlink(path).encode())
            elif os.path.isfile(path):
                digest.update(open(path, "rb").read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> str:
    """A work directory with committed steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("two_steps")
    trainer = Trainer(_config(workdir, **{"train.steps": 2, "checkpoint.every": 1}))
    trainer.fit()
    assert trainer.checkpointer.steps() == [1, 2]
    return str(workdir)


def _copy(source: str, tmp_path) -> tuple[str, str]:
    shutil.copytree(source, tmp_path / "run")
    return str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints")


def test_every_step_damaged_refuses_and_changes_nothing(tmp_path, two_steps):
    workdir, checkpoints = _copy(two_steps, tmp_path)
    for step in (1, 2):
        flip_a_byte(os.path.join(checkpoints, str(step)))
    before = tree_hash(checkpoints)
    with pytest.raises(NoVerifiedCheckpoint) as refused:
        Trainer(_config(workdir, **{"train.steps": 3}))
    message = str(refused.value)
    assert "step 2: damaged leaves" in message and "step 1: damaged leaves" in message
    assert "nothing was changed" in message and "\n" not in message
    assert tree_hash(checkpoints) == before


@pytest.mark.slow
def test_every_step_damaged_is_one_line_on_the_command_line(tmp_path, two_steps):
    workdir, checkpoints = _copy(two_steps, tmp_path)
    for step in (1, 2):
        flip_a_byte(os.path.join(checkpoints, str(step)))
    before = tree_hash(checkpoints)
    run = subprocess.run([sys.executable, "-m", "efficient_train.cli", "train", "--devices", "8", "--workdir", workdir,
                          *SMALL, "--config.train.steps=3", "--config.mesh.data=8"],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no checkpoint in {checkpoints} verifies"), run.stderr
    assert tree_hash(checkpoints) == before


@pytest.mark.slow
def test_a_damaged_newest_step_is_set_aside_and_the_run_continues_past_it(tmp_path, two_steps, capsys):
    workdir, checkpoints = _copy(two_steps, tmp_path)
    flip_a_byte(os.path.join(checkpoints, "2"))
    damaged_bytes = tree_hash(os.path.join(checkpoints, "2"))
    trainer = Trainer(_config(workdir, **{"train.steps": 3, "checkpoint.every": 1}))
    assert int(trainer.state.step) == 1
    kept = os.path.join(checkpoints, "damaged-2")
    assert tree_hash(kept) == damaged_bytes  # moved aside whole, not deleted or rewritten
    assert "set the damaged step 2 aside as" in capsys.readouterr().out
    assert cli.main(["checkpoint", "inspect", checkpoints]) == 0  # inspect lists it
    assert f"damaged steps set aside in {checkpoints} " in capsys.readouterr().out
    trainer.fit()  # trains steps 2 and 3 again and saves them: no StepAlreadyExistsError
    assert trainer.checkpointer.steps() == [1, 2, 3]
    for step in (2, 3):
        assert verify_step(os.path.join(checkpoints, str(step))) == []
    resumed = Trainer(_config(workdir, **{"train.steps": 4}))
    assert int(resumed.state.step) == 3
    resumed.fit()
    assert resumed.checkpointer.steps()[-1] == 4 and os.path.isdir(kept)


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"), MemoryError("out of host memory")])
def test_an_error_that_is_not_damage_stops_the_run_and_changes_nothing(tmp_path, two_steps, monkeypatch, failure):
    workdir, checkpoints = _copy(two_steps, tmp_path)
    before = tree_hash(checkpoints)

    def failing_restore(self, step, args=None):  # the filesystem (or memory) fails under the restore
        raise failure

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    with pytest.raises(CheckpointReadError) as stopped:
        Trainer(_config(workdir, **{"train.steps": 3}))
    assert not isinstance(stopped.value, DamagedCheckpoint)
    assert str(stopped.value).startswith("step 2 could not be restored")
    assert type(failure).__name__ in str(stopped.value) and "not proven damaged" in str(stopped.value)
    assert tree_hash(checkpoints) == before
    monkeypatch.undo()  # the disk is back: the same directory resumes at step 2
    assert int(Trainer(_config(workdir, **{"train.steps": 3})).state.step) == 2


def test_retention_never_follows_a_link_out_of_the_checkpoint_directory(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"keep me")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    os.symlink(outside, checkpoints / "_deleted")
    with pytest.raises(CheckpointError, match=r"^checkpoint\.dir: .*_deleted is a symlink"):
        Checkpointer(str(checkpoints), keep=1, keep_every=0, async_save=False)
    os.unlink(checkpoints / "_deleted")
    (checkpoints / "_deleted").mkdir()
    os.symlink(outside, checkpoints / "_deleted" / "7")  # a step retention moved aside, as a link
    Checkpointer(str(checkpoints), keep=1, keep_every=0, async_save=False)
    assert os.listdir(checkpoints / "_deleted") == []  # the link is gone ...
    assert (outside / "data.bin").read_bytes() == b"keep me"  # ... its target untouched


_HOLD_LOCK = """
import sys, time
from efficient_train.checkpoint.lock import DirectoryLock
DirectoryLock(sys.argv[1], "a test's run").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    for locked, config in ((workdir, _config(workdir)),
                           (workdir / "checkpoints", _config(tmp_path / "other", **{"checkpoint.dir": str(workdir / "checkpoints")}))):
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(locked)], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(DirectoryInUse) as refused:
                Trainer(config)
            assert f"process {holder.pid} on host" in str(refused.value) and "a test's run" in str(refused.value)
            assert not os.path.exists(workdir / "checkpoints" / "1")
        finally:
            holder.kill()  # SIGKILL: the lock is stale now, and the next run takes it over
            holder.wait()
    config.train.steps = 1
    Trainer(config).fit()
    assert os.path.isdir(workdir / "checkpoints" / "1")


class Huge(nnx.Module):
    """One weight near the float32 maximum: an update of the size of the learning rate overflows it."""

    def __init__(self):
        self.w = nnx.Param(jnp.full((8,), 3.0e38, jnp.float32))


def _pull_up(model, batch):  # d loss / d w < 0: AdamW moves w up by about the learning rate
    return -jnp.mean(model.w[...] * 1e-2 * batch["x"])


def _ones():
    while True:
        yield {"x": np.ones((8, 8), np.float32)}


def test_a_state_made_non_finite_by_the_update_is_never_saved(tmp_path):
    config = get_config()
    config.mesh.data = 8
    config.workdir = str(tmp_path)
    config.optimizer.weight_decay = 0.0
    config.train.update(steps=3, batch_size=8, warmup_steps=0, learning_rate=1e38, log_every=1)
    with nnx.use_eager_sharding(False):
        model = Huge()
    trainer = Trainer(config, model=model, loss_fn=_pull_up, data=_ones())
    with pytest.raises(NonFiniteState, match=r"^step 1: the update made the parameters or optimizer state non-finite"):
        trainer.fit()
    assert trainer.checkpointer.steps() == []
    assert not glob.glob(os.path.join(tmp_path, "checkpoints", "*"))


def test_the_end_of_a_users_data_ends_the_run_with_a_save(tmp_path, capsys):
    def three_batches():
        batches = classification_batches()
        for _ in range(3):
            yield next(batches)

    config = get_config()
    config.mesh.data = 8
    config.workdir = str(tmp_path)
    config.train.update(steps=10, batch_size=32, warmup_steps=0, learning_rate=1e-2, log_every=10)
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    trainer = Trainer(config, model=model, loss_fn=classification_loss, data=three_batches())
    trainer.fit()
    assert trainer.stop_reason == "data_exhausted" and int(trainer.state.step) == 3
    assert trainer.checkpointer.steps() == [3]
    assert "the data ended after step 3, before train.steps=10; saved step 3" in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {"event": "data_exhausted", "step": 3} in records
    # More data: the next run continues from step 3 to the end.
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    resumed = Trainer(config, model=model, loss_fn=classification_loss, data=classification_batches(seed=1))
    assert int(resumed.state.step) == 3
    resumed.fit()
    assert resumed.stop_reason is None and resumed.checkpointer.steps()[-1] == 10
    with pytest.raises(InputError, match=r"^data: the iterator yielded no batch"):
        Trainer(config, model=model, loss_fn=classification_loss, data=iter([]))


def test_a_loss_weight_of_zero_is_refused(tmp_path):
    config = get_config()
    config.mesh.data = 8
    config.workdir = str(tmp_path)
    config.train.update(steps=2, batch_size=32, warmup_steps=0)
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    trainer = Trainer(config, model=model, loss_fn=lambda m, b: (classification_loss(m, b), 0.0),
                      data=classification_batches())
    with pytest.raises(ValueError, match=r"^loss_fn: returned a weight of 0\.0 at step 1"):
        trainer.fit()
    assert int(trainer.state.skipped_steps) == 1  # and the step did not update anything
    with pytest.raises(ValueError, match=r"^Hook\.every: 0 must be a positive integer"):
        Hook(every=0, fn=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_at_the_next_step_and_exit_cleanly(tmp_path, signum, exit_code):
    workdir = str(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "efficient_train.cli", "train", "--devices", "8", "--workdir", workdir, *SMALL,
         "--config.train.steps=100000", "--config.train.log_every=1", "--config.checkpoint.every=0",
         "--config.mesh.data=8", "--config.zero_stage=3"],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and open(metrics).read().count('"loss"') >= 2):
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == exit_code, stderr[-2000:]
    assert "Traceback" not in stderr
    assert ("saving at the end of this step" in stderr) == (signum == signal.SIGINT)
    records = [json.loads(line) for line in open(metrics)]
    stopped = [r for r in records if r.get("event") == "preempted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.Signals(signum).name
    assert Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, keep_every=0,
                        async_save=False).steps() == [stopped[0]["step"]]


_FILL_METRICS = """
import json, resource, sys
from efficient_train.train.metrics import MetricsWriteError, MetricsWriter
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
writer = MetricsWriter(sys.argv[1], enabled=True)
try:
    for step in range(1000):
        writer.write({"step": step, "loss": 1.0 / (step + 1), "note": "x" * 37})
except MetricsWriteError as error:
    print(error)
"""


def test_a_full_disk_stops_the_metrics_file_at_a_whole_line(tmp_path):
    env = dict(os.environ)
    run = subprocess.run(["bash", "-c", "trap '' XFSZ; exec \"$@\"", "x", sys.executable, "-c", _FILL_METRICS,
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"metrics: writing {tmp_path}/metrics.jsonl failed") and "File too large" in run.stdout
    content = (tmp_path / "metrics.jsonl").read_bytes()
    assert 0 < len(content) <= 1000 and content.endswith(b"\n")
    steps = [json.loads(line)["step"] for line in content.decode().splitlines()]
    assert steps == list(range(len(steps)))


def _tokens_config(workdir, path, steps):
    return _config(workdir, **{"data.source": "tokens", "data.path": str(path), "train.steps": steps,
                               "checkpoint.every": 0, "data.shuffle": False})


def test_a_token_file_truncated_mid_run_saves_the_last_good_step_and_resume_is_exact(tmp_path):
    path = tmp_path / "tokens.bin"
    original = np.random.default_rng(0).integers(0, 256, size=16 * 33 * 8, dtype=np.uint16).tobytes()
    path.write_bytes(original)
    straight = {}
    Trainer(_tokens_config(tmp_path / "straight", path, 4),
            hooks=[Hook(every=1, fn=lambda t, step, record: straight.__setitem__(step, record["loss"]))]).fit()

    def truncate(trainer, step, record):
        with open(path, "r+b") as f:
            f.truncate(len(original) // 8)

    with pytest.raises(Exception) as stopped:  # DataError, an InputError: exit 2 on the command line
        Trainer(_tokens_config(tmp_path / "run", path, 4), hooks=[Hook(every=2, fn=truncate)]).fit()
    assert type(stopped.value).__name__ == "DataError", repr(stopped.value)
    assert str(path) in str(stopped.value) and str(stopped.value).endswith("; saved step 2, a rerun continues from there")
    path.write_bytes(original)  # the file is whole again: the rerun continues at step 3, batch for batch
    resumed = {}
    trainer = Trainer(_tokens_config(tmp_path / "run", path, 4),
                      hooks=[Hook(every=1, fn=lambda t, step, record: resumed.__setitem__(step, record["loss"]))])
    assert int(trainer.state.step) == 2
    trainer.fit()
    assert resumed == {3: straight[3], 4: straight[4]}


@contextlib.contextmanager
def _read_only(path):
    """`path` made unwritable: immutable for root (chattr +i), mode 0555 for others."""
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    else:
        os.chmod(path, 0o555)
    try:
        try:
            open(os.path.join(path, "probe"), "w").close()
        except OSError:
            pass
        else:
            pytest.skip("this filesystem cannot make a directory read-only")
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            os.chmod(path, 0o755)


@pytest.mark.slow
def test_a_read_only_checkpoint_directory_exits_promptly_after_its_line(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    with _read_only(checkpoints):  # not even a lock file can be made: refused before any work
        with pytest.raises(Exception, match=r"cannot write its lock file .*must be a writable directory"):
            Trainer(_config(tmp_path, **{"train.steps": 2}))
    (checkpoints / LOCK_FILE).touch()  # an earlier run's lock file: the run starts, its saves fail
    with _read_only(checkpoints):
        started = time.time()
        process = subprocess.Popen(
            [sys.executable, "-m", "efficient_train.cli", "train", "--devices", "8", "--workdir", str(tmp_path), *SMALL,
             "--config.train.steps=4", "--config.checkpoint.every=2", "--config.mesh.data=8"],
            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line_at, stderr = None, b""
        for chunk in iter(lambda: process.stderr.read1(4096), b""):
            stderr += chunk
            if line_at is None and b"\nerror: " in stderr:
                line_at = time.time()
        process.wait(timeout=300)
        exited_at = time.time()
    text = stderr.decode()
    assert process.returncode == 1 and "Traceback" not in text, text[-2000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step 2 was not saved, writing it failed"), text[-2000:]
    assert errors[0].endswith(f"(library messages: {tmp_path}/logs/process_0.log)")
    assert exited_at - line_at < 5, (exited_at - started, exited_at - line_at)


@pytest.mark.slow
def test_a_data_problem_on_one_process_stops_every_process_after_one_save(tmp_path):
    port = subprocess.run([sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); "
                           "print(s.getsockname()[1])"], capture_output=True, text=True).stdout.strip()
    workers = [subprocess.Popen([sys.executable, "-m", "tests.support.data_failure_worker", str(i), port, str(tmp_path)],
                                cwd=ROOT, env=subprocess_env(devices=4), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    lines = [[line for line in output.splitlines() if line.startswith("DataError: ")] for output in outputs]
    assert [worker.returncode for worker in workers] == [2, 2], outputs
    suffix = "; saved step 3, a rerun continues from there"
    assert lines[1] == [f"DataError: shard-1.jsonl: line 7: not valid JSON{suffix}"], outputs[1][-2000:]
    assert lines[0] == [f"DataError: process 1 of this run met a data problem (its own error line names it){suffix}"]
    assert Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=3, keep_every=0, async_save=False).steps() == [3]


def test_resume_with_another_optimizer_state_format_names_the_setting_and_the_convert_command(tmp_path, two_steps):
    workdir, checkpoints = _copy(two_steps, tmp_path)
    before = tree_hash(checkpoints)
    with pytest.raises(CheckpointError) as refused:
        Trainer(_config(workdir, **{"optimizer.state_format": "int8"}))
    message = str(refused.value)
    assert message.startswith("step 2 holds optimizer states of another layout (optimizer.state_format: saved "
                              "'fp32', this run 'int8')")
    assert f"efficient-train checkpoint convert {checkpoints}/2 NEW_DIR --mesh data=N --state_format int8" in message
    assert tree_hash(checkpoints) == before  # a refusal, not damage: nothing set aside


def test_retention_deletes_only_after_a_newer_step_reads_back_verified(tmp_path, capsys):
    state = {"w": jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024)}
    saving = dict(model={}, mesh={"data": 1}, zero_stage=0, optimizer={}, data=None, seed=0)
    checkpointer = Checkpointer(str(tmp_path), keep=1, keep_every=0, async_save=False)
    checkpointer.save(1, state, **saving)
    checkpointer.save(2, state, **saving)
    flip_a_byte(str(tmp_path / "2"))  # step 2 went bad on its way to the disk
    checkpointer.finish()
    assert checkpointer.steps() == [1, 2]  # keep=1, yet step 1 stays: step 2 did not verify
    assert "WARNING: step 2 did not verify when read back after writing" in capsys.readouterr().out
    checkpointer.save(3, state, **saving)
    checkpointer.close()
    assert checkpointer.steps() == [3]  # step 3 verified: now the older steps go
    assert os.listdir(tmp_path / "_deleted") == []


_FILL_THE_LIBRARY_LOG = """
import logging, resource, sys, threading
from efficient_train.train.library_log import library_output_to_file
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
with library_output_to_file(sys.argv[1], 0) as path:
    for i in range(100):
        logging.getLogger("absl").error("a library's message %d about the failed write", i)
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()
print(path)
"""


def test_a_full_library_log_never_spills_onto_the_console(tmp_path):
    """The disk that failed a checkpoint write often fills the log too: what cannot be
    written there is dropped, never printed to the console, never raised."""
    run = subprocess.run(["bash", "-c", "trap '' XFSZ; exec \"$@\"", "x", sys.executable, "-c", _FILL_THE_LIBRARY_LOG,
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    log = open(run.stdout.strip()).read()
    assert log.count("about the failed write") > 5 and len(log) <= 2000
