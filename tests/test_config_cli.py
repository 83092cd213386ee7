"""Config validation and the command line: one clear line naming the field, exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from efficient_train.config import ConfigError, apply_overrides, default_config, get_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides: str):
    c = default_config()
    apply_overrides(c, overrides)
    return c


@pytest.mark.parametrize(
    "overrides, devices, field",
    [
        ({"mesh.data": "3"}, 8, "mesh:"),
        ({"mesh.data": "-1", "mesh.tensor": "3"}, 8, "mesh.data"),
        ({"mesh.data": "8", "train.batch_size": "12"}, 8, "train.batch_size"),
        ({"mesh.data": "4", "train.batch_size": "16", "train.grad_accum": "3"}, 4, "train.grad_accum"),
        ({"mesh.data": "2", "mesh.tensor": "4", "model.num_heads": "6", "model.num_kv_heads": "2"}, 8, "mesh.tensor"),
        ({"model.num_kv_heads": "3"}, 1, "model.num_kv_heads"),
        ({"zero_stage": "4"}, 1, "zero_stage"),
        ({"model.remat": "sometimes"}, 1, "model.remat"),
        ({"attention.impl": "flash"}, 1, "attention.impl"),
        ({"sequence_parallel.mode": "spiral"}, 1, "sequence_parallel.mode"),
        ({"train.schedule": "step"}, 1, "train.schedule"),
        ({"data.source": "web"}, 1, "data.source"),
        ({"model.hidden_size": "0"}, 1, "model.hidden_size"),
        ({"train.steps": "-5"}, 1, "train.steps"),
        ({"data.seq_len": "0"}, 1, "data.seq_len"),
        ({"data.source": "tokens", "data.path": "/nonexistent/tokens.bin"}, 1, "data.path"),
    ],
)
def test_validate_names_the_field(overrides, devices, field):
    with pytest.raises(ConfigError) as error:
        validate(_config(**overrides), devices)
    message = str(error.value)
    assert message.startswith(field), message
    assert "\n" not in message


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match=r"^train\.stepz: unknown config key"):
        apply_overrides(default_config(), {"train.stepz": "3"})
    with pytest.raises(ConfigError, match=r"^modle: unknown config key"):
        apply_overrides(default_config(), {"modle.hidden_size": "3"})
    c = default_config()
    c.unlock()
    c.train.extra = 1
    with pytest.raises(ConfigError, match=r"^train\.extra: unknown config key"):
        validate(c, 1)


def test_overrides_parse_to_the_field_type():
    c = _config(**{"train.learning_rate": "1e-4", "model.tie_embeddings": "false", "mesh.data": "4"})
    assert c.train.learning_rate == 1e-4 and c.model.tie_embeddings is False and c.mesh.data == 4
    with pytest.raises(ConfigError, match=r"^mesh\.data: cannot read 'four' as int"):
        _config(**{"mesh.data": "four"})


def test_a_renamed_field_still_works_and_says_so(capsys):
    c = _config(**{"checkpoint.async": "false"})
    assert c.checkpoint.async_save is False
    assert capsys.readouterr().err.strip() == (
        "warning: --config.checkpoint.async is deprecated; use --config.checkpoint.async_save")


def test_valid_configs_pass_and_fill_minus_one():
    assert validate(_config(**{"mesh.tensor": "2"}), 8) == {"replica": 1, "data": 4, "expert": 1, "sequence": 1, "tensor": 2}
    for name in ("tiny", "gpt2_small", "llama_1b", "llama_8b"):
        config = get_config(os.path.join(ROOT, "configs", f"{name}.py"))
        validate(config, 8)
    llama_70b = get_config(os.path.join(ROOT, "configs", "llama_70b.py"))
    llama_70b.mesh.update(data=8, tensor=8)  # as its docstring's command
    validate(llama_70b, 64)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "efficient_train.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize(
    "args, field",
    [
        (["train", "--config.zero_stage=7"], "zero_stage"),
        (["train", "--config.mesh.data=3"], "mesh"),
        (["train", "--config.nope=1"], "nope"),
        (["train", "--config", "configs/missing.py"], "config"),
        (["train", "--config.data.source=tokens", "--config.data.path=/nonexistent"], "data.path"),
        (["train", "--bogus"], "unrecognized argument"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, field):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_config_errors_answer_without_importing_jax():
    """`--help` and a refused flag need neither jax nor Orbax (a second of imports)."""
    probe = ("import sys; from efficient_train.cli import main\n"
             "for argv in (['--help'], ['train', '--config.nope=1'], ['checkpoint', '--help']):\n"
             "    try: main(argv)\n"
             "    except SystemExit: pass\n"
             "print(sorted(m for m in ('jax', 'orbax', 'flax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_overrides_that_cannot_apply_are_one_line():
    c = _config(**{"train.steps": "1e3", "train.batch_size": "1_024"})  # integral notations of an int
    assert c.train.steps == 1000 and c.train.batch_size == 1024
    for overrides, message in (
        ({"train": "5"}, r"^train: is a section; set one of its fields: batch_size"),
        ({"train.steps": "2.5"}, r"^train\.steps: cannot read '2\.5' as int"),
        ({"model.vocab_size": "1e400"}, r"^model\.vocab_size: cannot read '1e400' as int"),
    ):
        with pytest.raises(ConfigError, match=message):
            _config(**overrides)
    c = _config(**{"workdir": "a\0b"})
    with pytest.raises(ConfigError, match=r"^workdir: 'a\\x00b' contains a NUL byte"):
        validate(c, 8)


@pytest.mark.parametrize(
    "args, field",
    [
        (["train", "--config.eval.sets=foo"], "eval.sets"),
        (["train", "--config.eval.every=10"], "eval.every"),
        (["train", "--config.tracker.wandb.mode=cloud"], "tracker.wandb.mode"),
        (["train", "--config.profile.start_step=0"], "profile.start_step"),
        (["train", "--config.sample.every=5"], "sample.every"),
        (["train", "--config.sample.top_p=0"], "sample.top_p"),
        (["train", "--config.sample.top_k=-1"], "sample.top_k"),
        (["train", "--config.moe.impl=megablox"], "moe.impl"),
        (["train", "--config.moe.impl=pallas"], "moe.impl"),  # a dense model
        (["train", "--config.moe.impl=pallas", "--config.model.num_experts=4", "--config.mesh.tensor=2"], "moe.impl"),
        (["train", "--config.moe.impl=pallas", "--config.model.num_experts=4", "--config.model.capacity_factor=1.5"],
         "moe.impl"),
        (["eval", "--checkpoint", "/nonexistent"], "--data"),
        (["eval", "--checkpoint", "/nonexistent", "--data", "validation"], "eval.sets"),
        (["eval", "--checkpoint", "/nonexistent", "--data", "x=/nonexistent"], "eval.sets"),
    ],
)
def test_watching_fields_bad_input_is_one_line_and_exit_2(args, field, capsys):
    """Evaluation, tracker, profile, sample and moe.impl fields, and the eval command's flags: refused in one
    line naming the field before anything runs (in-process: these checks precede jax's work)."""
    from efficient_train.cli import main

    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}"), lines
