"""Bad input without a traceback (issue 13): every case is one line naming the field, file
or position and what is allowed, with exit status 2 (bad input) or 1 (a runtime failure).

Most cases run `efficient_train.cli.main` in this process and stop before any jax work
(validation comes first); the data cases call the data package's builders directly.
Subprocesses only where a case needs one: a device count or environment of its own, a
command that used to hang, and a token file truncated under a running reader (which
used to die of SIGBUS, a death no test process should share).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from efficient_train.cli import main
from efficient_train.config import ConfigError, apply_overrides, default_config, validate
from efficient_train.data import (
    DataError,
    DataLoader,
    JsonlSource,
    LoaderState,
    TextSource,
    TokenFileSource,
    build_loader,
)
from efficient_train.errors import InputError
from efficient_train.parallel.mesh import (
    DistributedArgs,
    LaunchError,
    distributed_args_from_env,
    initialize_distributed,
)
from tests.support.subprocess_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_ENV = ("EFFICIENT_TRAIN_COORDINATOR", "EFFICIENT_TRAIN_NUM_PROCESSES", "EFFICIENT_TRAIN_PROCESS_ID",
              "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri")


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run main(argv) in an empty working directory; check the one-line contract; return stderr's last line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored even if main sets it
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str, status: int = 2, names: str) -> str:
        code = main(list(argv))
        err = capsys.readouterr().err
        assert code == status, err
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and names in last, err
        return last

    return run


def _config(**overrides: str) -> ml_collections.ConfigDict:
    config = default_config()
    apply_overrides(config, overrides)
    return config


# ------------------------------------------------------------------------------ config


def test_config_file_with_a_syntax_error_names_file_and_line(cli, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from efficient_train.config import default_config\n\n"
                   "def get_config(:\n    return default_config()\n")
    line = cli("train", "--config", str(bad), names=f"'{bad}' line 3: syntax error")
    assert os.listdir(tmp_path) == ["bad.py"]  # nothing created
    assert line.count("\n") == 0


def test_config_file_that_raises_names_file_line_and_field(cli, tmp_path):
    bad = tmp_path / "wrong_type.py"
    bad.write_text(textwrap.dedent("""\
        from efficient_train.config import default_config


        def get_config():
            c = default_config()
            c.train.steps = "ten"
            return c
        """))
    cli("estimate", "--config", str(bad), names=f"'{bad}' line 6 (`c.train.steps = \"ten\"`): TypeError")
    missing = tmp_path / "no_get_config.py"
    missing.write_text("x = 1\n")
    cli("train", "--config", str(missing), names="has no get_config() function")
    os.mkfifo(tmp_path / "pipe.py")
    cli("train", "--config", str(tmp_path / "pipe.py"), names="is not a regular file")
    other = tmp_path / "returns_dict.py"
    other.write_text("def get_config():\n    return {'train': {}}\n")
    cli("train", "--config", str(other), names="returned a dict; it must return an ml_collections.ConfigDict")


def test_wrong_types_in_a_rebuilt_section_name_the_field(cli, tmp_path):
    """A config file can bypass ConfigDict's type safety by building a section anew: validation checks types."""
    bad = tmp_path / "rebuilt.py"
    bad.write_text(textwrap.dedent("""\
        import ml_collections
        from efficient_train.config import default_config


        def get_config():
            c = default_config()
            c.unlock()
            c.train = ml_collections.ConfigDict(dict(c.train.to_dict(), steps="ten"))
            return c
        """))
    cli("train", "--config", str(bad), names="train.steps: 'ten' is a str; it must be an integer")
    cases = {
        "model.tie_embeddings": (1, "must be True or False"),
        "mesh.data": (True, "must be an integer"),
        "train.batch_size": (16.0, "must be an integer"),
        "data.path": (3, "must be a string"),
        "optimizer.b1": ("0.9", "must be a finite number"),
    }
    for field, (value, allowed) in cases.items():
        config = default_config()
        section, key = field.split(".")
        config.unlock()
        config[section] = ml_collections.ConfigDict(dict(config[section].to_dict(), **{key: value}))
        with pytest.raises(ConfigError, match=rf"^{field}: .*; it {allowed}"):
            validate(config, 8, check_paths=False)
    config = default_config()
    config.unlock()
    config.train = ml_collections.ConfigDict({k: v for k, v in config.train.to_dict().items() if k != "steps"})
    with pytest.raises(ConfigError, match=r"^train\.steps: missing from the config"):
        validate(config, 8, check_paths=False)


@pytest.mark.parametrize("argv", [["--workdir", ""], ["--config.workdir="], ["--config.workdir", "  "]])
def test_empty_workdir_is_refused_before_anything_is_created(cli, tmp_path, argv):
    cli("train", *argv, names="workdir: ")
    assert os.listdir(tmp_path) == []  # it used to create ./checkpoints before failing


def test_workdir_that_is_a_file_is_refused(cli, tmp_path):
    (tmp_path / "taken").write_text("")
    cli("train", "--workdir", "taken", "--config.data.source=synthetic",
        names="workdir: 'taken' exists and is not a directory")
    assert os.listdir(tmp_path) == ["taken"]


@pytest.mark.parametrize(
    "override, names",
    [
        ("model.vocab_size=1e11", "model.vocab_size: 100000000000 exceeds the bound 2147483647"),
        ("model.vocab_size=100000000000", "model.vocab_size: 100000000000 exceeds the bound 2147483647"),
        ("model.head_dim=33", "model.head_dim: 33 is odd"),
        ("train.batch_size=1099511627776", "train.batch_size x data.seq_len: 1099511627776 x 128"),
        ("data.seq_len=4294967296", "data.seq_len: 4294967296 exceeds the bound"),
        ("train.learning_rate=inf", "train.learning_rate: inf is not finite"),
        ("optimizer.eps=0.0", "optimizer.eps: 0.0 must be a number > 0"),
        ("train.learning_rate=nan", "train.learning_rate: nan is not finite"),
        ("train.warmup_steps=inf", "train.warmup_steps: cannot read 'inf' as int"),
        ("train.log_every=0", "train.log_every: 0 must be a number > 0"),
        ("checkpoint.every=-1", "checkpoint.every: -1 must be a number >= 0"),
        ("checkpoint.keep=-1", "checkpoint.keep: -1 must be a number >= 0"),
        ("checkpoint.keep_every=-2", "checkpoint.keep_every: -2 must be a number >= 0"),
        ("seed=4294967296", "seed: 4294967296 must lie in [0, 4294967295]"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio: 2.0 must lie in [0.0, 1.0]"),
        ("data.eos_id=-5", "data.eos_id: -5 must be -1"),
        ("mesh.data=0", "mesh.data: 0 must be a positive integer or -1"),
    ],
)
def test_bad_fields_are_refused_before_jax(cli, override, names):
    cli("train", f"--config.{override}", names=names)
    cli("estimate", "--devices", "8", f"--config.{override}", names=names)


def _float_fields(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    fields = []
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            fields += _float_fields(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            fields.append(f"{prefix}{key}")
    return fields


FLOAT_FIELDS = _float_fields(default_config())


def test_every_float_field_is_covered():
    assert {"train.learning_rate", "optimizer.weight_decay", "optimizer.b1", "optimizer.b2", "optimizer.eps",
            "train.max_grad_norm", "model.rms_norm_eps", "model.rope_theta", "train.min_lr_ratio"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: {value} is not finite"):
        validate(_config(**{field: value}), 8, check_paths=False)


def test_huge_models_and_steps_are_bounded_before_compiling():
    """A rough count of a step's bytes per device (Python ints: no overflow) refuses what would abort XLA."""
    with pytest.raises(ConfigError, match=r"^train\.batch_size x data\.seq_len: 8388608 x 128 tokens per step need "
                                          r"about .* bytes of activations per device, beyond the bound of 2\*\*50"):
        validate(_config(**{"train.batch_size": str(2**23), "model.vocab_size": str(2**24)}), 8, check_paths=False)
    with pytest.raises(ConfigError, match=r"^model: .* parameters need about .* beyond the bound of 2\*\*50"):
        validate(_config(**{"model.vocab_size": str(2**30), "model.hidden_size": str(2**20)}), 8, check_paths=False)
    validate(_config(**{"train.batch_size": "1024", "data.seq_len": "8192"}), 8, check_paths=False)  # large is fine


# ------------------------------------------------------------------------- devices, mesh


def test_unreachable_mesh_for_devices_is_refused_before_jax(cli):
    cli("train", "--devices", "4", "--config.mesh.data=8", names="mesh: ")
    cli("train", "--devices", "3", names="train.batch_size: 16 is not divisible by the data-parallel size")
    cli("estimate", "--devices", "8", "--config.mesh.data=3", names="mesh: ")
    cli("estimate", "--config.mesh.data=-1", names="mesh: estimate needs every mesh axis sized")


def test_device_counts_are_bounded(cli):
    cli("estimate", "--devices", "20000", names="--devices: 20000 must lie in [1, 2048]")
    cli("train", "--devices", "0", names="--devices: 0 must lie in [1, 2048]")
    cli("estimate", "--config.mesh.data=20000", names="mesh: replica=1 x data=20000")
    with pytest.raises(InputError, match=r"^devices: 4096 simulated CPU devices"):
        from efficient_train.cli import _simulate_devices

        _simulate_devices(4096)


def test_estimate_with_a_huge_device_count_answers_at_once():
    """It used to hang starting 20000 simulated devices: now refused before jax starts."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "efficient_train.cli", "estimate", "--devices", "20000"],
                            capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == ["error: --devices: 20000 must lie in [1, 2048]; the CPU backend "
                                                  "compiles for at most 2048 simulated devices"]


# ---------------------------------------------------------------------- multi-process


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--num_processes", "2"], "--num_processes: 2 processes need --coordinator HOST:PORT"),
        (["--num_processes", "2", "--process_id", "2", "--coordinator", "127.0.0.1:1234"],
         "--process_id: 2 must be below --num_processes = 2"),
        (["--process_id", "1"], "--process_id: 1 must be below --num_processes = 1"),
        (["--num_processes", "-1"], "--num_processes: -1 must be a positive integer"),
        (["--num_processes", "2", "--process_id", "-1", "--coordinator", "h:1"], "--process_id: -1 must be >= 0"),
        (["--num_processes", "2", "--coordinator", "localhost"], "--coordinator: 'localhost' is not HOST:PORT"),
        (["--num_processes", "2", "--coordinator", "h:99999"], "--coordinator: 'h:99999' is not HOST:PORT"),
    ],
)
def test_multi_process_flags_are_checked_before_jax_distributed(cli, argv, names):
    cli("train", *argv, names=names)


@pytest.mark.parametrize(
    "env, names",
    [
        ({"EFFICIENT_TRAIN_NUM_PROCESSES": "two"}, "EFFICIENT_TRAIN_NUM_PROCESSES: 'two' is not an integer"),
        ({"EFFICIENT_TRAIN_NUM_PROCESSES": "2", "EFFICIENT_TRAIN_PROCESS_ID": "1st",
          "EFFICIENT_TRAIN_COORDINATOR": "h:1"}, "EFFICIENT_TRAIN_PROCESS_ID: '1st' is not an integer"),
        ({"EFFICIENT_TRAIN_NUM_PROCESSES": "2", "EFFICIENT_TRAIN_PROCESS_ID": "5",
          "EFFICIENT_TRAIN_COORDINATOR": "h:1"},
         "EFFICIENT_TRAIN_PROCESS_ID: 5 must be below EFFICIENT_TRAIN_NUM_PROCESSES = 2"),
        ({"EFFICIENT_TRAIN_NUM_PROCESSES": "2"}, "EFFICIENT_TRAIN_NUM_PROCESSES: 2 processes need "
                                                 "EFFICIENT_TRAIN_COORDINATOR HOST:PORT"),
        ({"EFFICIENT_TRAIN_NUM_PROCESSES": "0"}, "EFFICIENT_TRAIN_NUM_PROCESSES: 0 must be a positive integer"),
        ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS: 'many' is not an integer"),
    ],
)
def test_multi_process_environment_is_checked_naming_the_variable(cli, monkeypatch, env, names):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli("train", names=names)


def test_launch_checks_hold_for_library_callers(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LaunchError, match=r"^--process_id: 3 must be below"):
        initialize_distributed(DistributedArgs("127.0.0.1:1", 2, 3))  # refused before jax.distributed
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # under SLURM, jax finds the coordinator itself
    assert distributed_args_from_env(DistributedArgs("", 2, 1)).num_processes == 2


def test_bad_environment_variable_through_the_command(tmp_path):
    env = dict(subprocess_env(), EFFICIENT_TRAIN_NUM_PROCESSES="two")
    result = subprocess.run([sys.executable, "-m", "efficient_train.cli", "train"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: EFFICIENT_TRAIN_NUM_PROCESSES: 'two'")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- data


def _data_config(**fields) -> ml_collections.ConfigDict:
    config = default_config().data
    config.unlock()
    config.update(fields)
    return config


def _build(source: str, path: Path | str, vocab: int = 256, **fields):
    return build_loader(_data_config(source=source, path=str(path), seq_len=8, **fields), vocab_size=vocab,
                        global_batch_size=2)


@pytest.mark.parametrize("source", ["text", "tokens", "jsonl"])
def test_fifo_as_data_path_is_refused_unopened(cli, tmp_path, source):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=rf"^data\.path: '{re.escape(str(fifo))}' is a FIFO \(named pipe\)"):
        _build(source, fifo)  # opening it would block forever
    with pytest.raises(DataError, match=r"is a FIFO"):
        {"text": TextSource, "tokens": TokenFileSource, "jsonl": JsonlSource}[source](fifo)
    cli("train", f"--config.data.source={source}", f"--config.data.path={fifo}", names=f"data.path: '{fifo}' is a FIFO")
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


@pytest.mark.parametrize(
    "content, names",
    [
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"line 2: not UTF-8 \(byte 0xff at column 11\)"),
        (b'{"text": [1, 99999999999999999999999]}\n',
         r"line 1: field 'text' has token id 99999999999999999999999 outside"),
        (b'{"text": [1, ' + b"9" * 5000 + b"]}\n", r"line 1: Exceeds the limit \(4300 digits\)"),
        (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", r"line 1: JSON nested too deeply"),
        (b'{"text": "a"}\n["text"]\n', r"line 2: a JSON list, not an object with field 'text'"),
        (b'{"text": "a"}\n\n{"body": "b"}\n', r"line 3: field 'text' missing"),
        (b'{"text": "a"}\n{"text": \n', r"line 2: not valid JSON \(Expecting value at column 10\)"),
        (b'{"text": [1, true]}\n', r"line 1: field 'text' must be a string or a list of ints"),
        (b"", r"has no non-empty 'text' documents"),
        (b'\n{"text": ""}\n\n{"text": ""}\n', r"has no non-empty 'text' documents"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, names):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^data\.path:? '{re.escape(str(path))}' {names}"):
        JsonlSource(path, vocab_size=256)


def test_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "abc"}\n')
    assert bytes(JsonlSource(path)[0].astype(np.uint8)) == b"abc"


def test_symlink_loops_and_special_files_in_a_text_directory_are_skipped(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.txt").write_bytes(b"beta")
    (root / "sub" / "up").symlink_to("..")  # a directory cycle: os.walk(followlinks=True) would never end
    (root / "self").symlink_to("self")  # ELOOP
    (root / "broken").symlink_to("nowhere")
    os.mkfifo(root / "pipe")  # would block a read
    with pytest.warns(UserWarning) as caught:
        source = TextSource(root)
    assert [p.relative_to(root).as_posix() for p in source.files] == ["a.txt", "sub/b.txt"]
    messages = " | ".join(str(w.message) for w in caught)
    for name in ("sub/up': a directory already read", "self': Too many levels of symbolic links",
                 "broken': No such file", "pipe': not a regular file"):
        assert name in messages, messages
    deep = tmp_path / "deep"
    path = deep
    for _ in range(300):
        path = path / "d"
    path.mkdir(parents=True)
    (path / "x.txt").write_bytes(b"x" * 20)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(250)  # below the tree's depth: a recursive walk would fail, the walk's stack does not
    try:
        assert TextSource(deep).files == [path / "x.txt"]
    finally:
        sys.setrecursionlimit(limit)


def test_empty_inputs_are_refused_naming_the_path(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"^data\.path: no non-empty files under '.*empty_dir'"):
        _build("text", tmp_path / "empty_dir")
    with pytest.raises(DataError, match=r"^data\.path: no non-empty files under '.*empty\.txt'"):
        _build("text", tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"^data\.path: '.*empty\.bin' is empty"):
        _build("tokens", tmp_path / "empty.bin")
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "short.bin")
    with pytest.raises(DataError, match=r"^data\.seq_len: the source '.*short\.bin' holds 5 tokens, fewer than"):
        _build("tokens", tmp_path / "short.bin")
    with pytest.raises(ConfigError, match=r"^data\.jsonl_field: '' is empty"):
        validate(_config(**{"data.jsonl_field": ""}), 8, check_paths=False)


def test_token_ids_beyond_the_vocab_name_file_and_offset(tmp_path):
    tokens = np.arange(4000, dtype=np.uint16) % 200
    tokens[3210] = 300
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    with pytest.raises(DataError, match=rf"^data\.path '{re.escape(str(path))}' token offset 3210: token id 300 "
                                        r"is outside \[0, 256\)"):
        _build("tokens", path)  # a small file is scanned at start


def test_token_ids_beyond_the_vocab_found_mid_run(tmp_path, monkeypatch):
    """A file above EAGER_CHECK_BYTES is checked per read: the batch that holds the id fails, naming its offset."""
    monkeypatch.setattr(TokenFileSource, "EAGER_CHECK_BYTES", 0)
    tokens = np.arange(4000, dtype=np.uint16) % 200
    tokens[3210] = 300
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    loader = _build("tokens", path, shuffle=False)
    with pytest.raises(DataError, match=rf"^data\.path '{re.escape(str(path))}' token offset 3210: token id 300"):
        for _ in range(1000):
            next(loader)
    assert loader.step == 3210 // (2 * 8)  # the failed batch did not advance the loader's state


_READER = textwrap.dedent("""\
    import sys
    import numpy as np
    from efficient_train.data import DataError, DataLoader, TokenFileSource

    path, mode = sys.argv[1], sys.argv[2]
    source = TokenFileSource(path, "uint16", doc_len=1024, vocab_size=65536)
    if mode == "mmap":  # the old way: a memory-mapped read
        mapped = np.memmap(path, dtype="uint16", mode="r")
        source._slice = lambda i, a, b: mapped[source._offsets[i] + a : source._offsets[i] + b]
    loader = DataLoader(source, seq_len=1024, global_batch_size=8, seed=0)
    next(loader)
    print("reading", flush=True)
    try:
        for _ in range(10**7):
            next(loader)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(3)  # the reader never saw the truncation
    """)


@pytest.mark.parametrize("mode", ["preadv", "mmap"])
def test_token_file_truncated_under_a_running_reader(tmp_path, mode):
    """The token source reads with preadv: a file that shrinks is a DataError; a mapped read died of SIGBUS."""
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 60000, size=4 << 20, dtype=np.uint16).tofile(path)  # 8 MiB
    script = tmp_path / "reader.py"
    script.write_text(_READER)
    env = dict(subprocess_env(), PYTHONPATH=ROOT)
    reader = subprocess.Popen([sys.executable, str(script), str(path), mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert reader.stdout.readline().strip() == "reading"
    os.truncate(path, 4096)  # another process cuts the file while the loop reads it
    _, err = reader.communicate(timeout=120)
    if mode == "mmap":
        assert reader.returncode == -signal.SIGBUS, err  # why the source no longer maps the file
        return
    assert reader.returncode == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: data.path '{path}' token offset "), last
    assert "the file shrank to 2048 tokens while this run reads it (it held 4194304 at start)" in last


def test_a_short_read_is_a_data_error_in_process(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    source = TokenFileSource(path, "uint16", doc_len=100)
    os.truncate(path, 400)  # 200 tokens left
    np.testing.assert_array_equal(source.read(1), np.arange(100, 200))
    with pytest.raises(DataError, match=rf"^data\.path '{re.escape(str(path))}' token offset 200: the file shrank "
                                        r"to 200 tokens"):
        source.read(2)


# ------------------------------------------------------------------------------ resume


def test_resume_with_other_data_is_one_line(tmp_path):
    state = DataLoader(SyntheticSourceFor(), seq_len=8, global_batch_size=4, seed=0).state().to_dict()
    for change, names in (({"seed": 1}, "data loader state seed: checkpoint has 0, this loader 1"),
                          ({"global_batch_size": 2}, "data loader state global_batch_size: checkpoint has 4")):
        kwargs = dict(seq_len=8, global_batch_size=4, seed=0) | change
        with pytest.raises(InputError, match=rf"^{names}"):
            DataLoader(SyntheticSourceFor(), **kwargs).restore(LoaderState.from_dict(state))
    for bad in (None, [1], {**state, "step": -1}):
        with pytest.raises(DataError, match=r"^data loader state"):
            DataLoader(SyntheticSourceFor(), seq_len=8, global_batch_size=4, seed=0).restore(LoaderState.from_dict(bad))


def SyntheticSourceFor():  # noqa: N802 - a tiny fixed source
    from efficient_train.data import SyntheticSource

    return SyntheticSource(16, seed=0, num_documents=8, doc_len=16)


@pytest.mark.slow
def test_resume_with_another_data_seed_through_the_command(cli, tmp_path):
    """End to end: a checkpoint of one data stream, resumed with another seed or batch, is one error line."""
    small = ["--workdir", "run", "--config.data.max_bytes=20000", "--config.model.num_layers=1",
             "--config.data.seq_len=16", "--config.train.steps=1", "--config.checkpoint.async_save=false"]
    assert main(["train", *small]) == 0
    cli("train", *small, "--config.data.seed=1", names="data loader state seed: checkpoint has 0, this loader 1")
    cli("train", *small, "--config.train.batch_size=8", names="data loader state global_batch_size")


def test_config_device_and_launch_errors_come_before_jax_is_imported(tmp_path):
    probe = textwrap.dedent("""\
        import sys
        from efficient_train.cli import main
        for argv in (["train", "--workdir", ""], ["train", "--config.train.learning_rate=nan"],
                     ["train", "--config.model.head_dim=33"], ["train", "--config.train.batch_size=1099511627776"],
                     ["estimate", "--devices", "20000"], ["train", "--devices", "4", "--config.mesh.data=8"],
                     ["train", "--num_processes", "2"], ["train", "--process_id", "3"]):
            assert main(argv) == 2, argv
        print(sorted(m for m in ("jax", "orbax", "flax") if m in sys.modules))
        """)
    env = {k: v for k, v in subprocess_env().items() if k not in LAUNCH_ENV}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 8 and "Traceback" not in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []
