"""The default configuration, config-file loading, and validation with one-line errors.

Every run is described by one ml_collections ConfigDict. `default_config()` holds every
field that exists (it is also the `tiny` recipe, so the installed package can train
with no config file); files in `configs/` start from it and change what they need.
The dict is locked, so an override of a key that does not exist fails at once.

`validate(config, num_devices)` checks what can be checked before any device work and
raises `ConfigError("<field>: <what is wrong>; <what is allowed>")`; the CLI prints that
one line and exits with status 2. Only the data-path check imports jax (through the
data package); the mesh arithmetic does not, so the CLI can size a simulated device
count before jax starts.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import ml_collections

from efficient_train.errors import InputError

ZERO_STAGES = (0, 1, 2, 3)
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
NORM_IMPLS = ("auto", "xla", "pallas")
SEQUENCE_PARALLEL_MODES = ("ulysses", "ring", "all_gather")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("synthetic", "text", "tokens", "jsonl")
TOKEN_DTYPES = ("uint16", "uint32")
STATE_FORMATS = ("fp32", "bf16", "int8", "fp8", "int4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # powers of two; the smallest is the last fallback
OPTIMIZER_KERNELS = ("auto", "xla", "pallas")
MESH_AXES = ("replica", "data", "sequence", "tensor")


class ConfigError(InputError):
    """A configuration problem, phrased as one line naming the field."""


def default_config() -> ml_collections.ConfigDict:
    """Every field, with the values of the `tiny` recipe (a ~0.8M-parameter byte-level Llama)."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 0
    c.zero_stage = 1

    c.mesh = ml_collections.ConfigDict(dict(replica=1, data=-1, sequence=1, tensor=1))

    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=384,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_embeddings=True,
            remat="none",
            scan_layers=True,
            dtype="float32",
            param_dtype="float32",
        )
    )
    c.attention = ml_collections.ConfigDict(dict(impl="auto"))
    # norm.impl: auto (= xla for now), xla, pallas (the fused pallas_kernels.rms_norm).
    c.norm = ml_collections.ConfigDict(dict(impl="auto"))
    c.sequence_parallel = ml_collections.ConfigDict(dict(mode="all_gather"))

    c.train = ml_collections.ConfigDict(
        dict(
            steps=150,
            batch_size=16,
            grad_accum=1,
            learning_rate=3e-3,
            warmup_steps=15,
            schedule="cosine",
            min_lr_ratio=0.1,
            max_grad_norm=1.0,
            log_every=10,
        )
    )
    # state_format: fp32 (optax.adamw), bf16, int8, fp8, int4 (experimental); see
    # efficient_train/optim. offload keeps the states in pinned host memory.
    c.optimizer = ml_collections.ConfigDict(
        dict(
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            state_format="fp32",
            block_size=256,
            min_quantized_size=4096,
            quantize_embeddings=True,
            offload=False,
            kernel="auto",
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="text",
            path="",
            seq_len=128,
            seed=0,
            shuffle=True,
            max_bytes=4_000_000,
            token_dtype="uint16",
            eos_id=-1,
            jsonl_field="text",
        )
    )
    # `async` is a Python keyword: read it as config.checkpoint["async"].
    # dir "" = <workdir>/checkpoints; every 0 = only at the end (and on SIGTERM);
    # keep the newest `keep` plus every `keep_every`-th step (0 = none extra).
    c.checkpoint = ml_collections.ConfigDict({"dir": "", "every": 50, "keep": 3, "keep_every": 0, "async": True})
    c.lock()
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Import a config file and call its `get_config()`."""
    if not os.path.isfile(path):
        raise ConfigError(f"config: file {path!r} does not exist; pass a path to a configs/*.py file")
    spec = importlib.util.spec_from_file_location(f"_efficient_train_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config: {path!r} has no get_config() function")
    return module.get_config()


def get_config(path: str | None = None) -> ml_collections.ConfigDict:
    """The default (`tiny`) config, or the one a config file's `get_config()` returns."""
    return default_config() if path is None else load_config_file(path)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Set dotted fields from strings (`{"mesh.data": "4"}`), parsed to the field's type."""
    for dotted, text in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for i, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise ConfigError(f"{'.'.join(parents[: i + 1])}: unknown config key; known: {_known(node)}")
            node = node[name]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"{dotted}: unknown config key; known: {_known(node)}")
        node[leaf] = _parse_like(node[leaf], text, dotted)


def _known(node: Any) -> str:
    return ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "(none)"


def _parse_like(current: Any, text: str, field: str) -> Any:
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{field}: cannot read {text!r} as {type(current).__name__}") from None
    return text


def _check_choice(config: ml_collections.ConfigDict, field: str, allowed: tuple) -> None:
    value = _get(config, field)
    if value not in allowed:
        raise ConfigError(f"{field}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _check_positive(config: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
    value = _get(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field}: {value!r} must be a number {bound}")


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    node: Any = config
    for name in field.split("."):
        node = node[name]
    return node


def _check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "") -> None:
    for key in config.keys():
        field = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(f"{field}: unknown config key; known: {_known(reference)}")
        if isinstance(reference[key], ml_collections.ConfigDict):
            if not isinstance(config[key], ml_collections.ConfigDict):
                raise ConfigError(f"{field}: must be a section with keys {_known(reference[key])}")
            _check_keys(config[key], reference[key], prefix=f"{field}.")


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with a -1 filled in from the device count; errors name the field."""
    sizes = {axis: mesh[axis] for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    for axis, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ConfigError(f"mesh.{axis}: {size!r} must be a positive integer or -1 (takes the remaining devices)")
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh.{free[0]}: cannot fill -1, the other axes multiply to {fixed} which does not divide "
                f"the {num_devices} devices"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ConfigError(f"mesh: {shape} = {fixed} devices, but {num_devices} are available; sizes must multiply to the device count")
    return sizes


def _sequence_parallel_problem(config: ml_collections.ConfigDict, mode: str, size: int) -> str | None:
    """Why `mode` cannot split this config's sequences over `size` devices; None if it can."""
    seq_len, heads, kv_heads = config.data.seq_len, config.model.num_heads, config.model.num_kv_heads
    if seq_len % size:
        return f"data.seq_len: {seq_len} must be divisible by mesh.sequence={size}"
    if mode == "ring" and seq_len % (2 * size):
        return (f"data.seq_len: {seq_len} must be divisible by 2 x mesh.sequence = {2 * size} for the zigzag "
                f"layout of sequence_parallel.mode 'ring'")
    if mode == "ulysses" and heads % size:
        return (f"sequence_parallel.mode: 'ulysses' splits heads over mesh.sequence={size}, which does not "
                f"divide model.num_heads={heads}")
    if mode == "ulysses" and kv_heads % size and size % kv_heads:
        return (f"sequence_parallel.mode: 'ulysses' needs model.num_kv_heads={kv_heads} to divide or be a "
                f"multiple of mesh.sequence={size}")
    return None


def _check_sequence_parallel(config: ml_collections.ConfigDict, size: int) -> None:
    """The mode exists and fits the model and mesh; errors suggest the modes that would fit."""
    mode = _get(config, "sequence_parallel.mode")
    fitting = [m for m in SEQUENCE_PARALLEL_MODES if size == 1 or not _sequence_parallel_problem(config, m, size)]
    suggestion = (f"sequence_parallel.mode {' or '.join(map(repr, fitting))} would fit" if fitting
                  else f"no sequence_parallel.mode fits mesh.sequence={size}")
    if mode not in SEQUENCE_PARALLEL_MODES:
        raise ConfigError(f"sequence_parallel.mode: {mode!r} is not one of "
                          f"{', '.join(map(repr, SEQUENCE_PARALLEL_MODES))}; {suggestion}")
    problem = _sequence_parallel_problem(config, mode, size) if size > 1 else None
    if problem:
        raise ConfigError(f"{problem}; {suggestion}")


def parse_mesh_flag(text: str) -> dict[str, int]:
    """"data=2,tensor=2" -> every mesh axis with its size (axes not named are 1)."""
    mesh = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (part.strip() for part in text.split(","))):
        axis, sep, size = item.partition("=")
        if not sep or axis not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ConfigError(
                f"--mesh: {item!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)} and SIZE a positive integer")
        mesh[axis] = int(size)
    return mesh


def validate(config: ml_collections.ConfigDict, num_devices: int, *, check_paths: bool = True) -> dict[str, int]:
    """Check the config against itself and the device count; returns the mesh shape."""
    _check_keys(config, default_config())
    if config.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"zero_stage: {config.zero_stage!r} is out of range; allowed 0, 1, 2, 3")
    for field in (
        "model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
        "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.rope_theta", "model.rms_norm_eps",
        "train.steps", "train.batch_size", "train.grad_accum", "train.learning_rate", "train.log_every",
        "train.max_grad_norm", "data.seq_len", "data.max_bytes",
    ):
        _check_positive(config, field)
    for field in ("train.warmup_steps", "train.min_lr_ratio", "optimizer.weight_decay", "optimizer.eps",
                  "optimizer.min_quantized_size", "checkpoint.every", "checkpoint.keep", "checkpoint.keep_every"):
        _check_positive(config, field, allow_zero=True)
    for field in ("optimizer.b1", "optimizer.b2"):
        if not 0.0 <= _get(config, field) < 1.0:
            raise ConfigError(f"{field}: {_get(config, field)!r} must be in [0, 1)")
    _check_choice(config, "model.remat", REMAT_POLICIES)
    _check_choice(config, "model.dtype", DTYPES)
    _check_choice(config, "model.param_dtype", DTYPES)
    _check_choice(config, "attention.impl", ATTENTION_IMPLS)
    _check_choice(config, "norm.impl", NORM_IMPLS)
    _check_choice(config, "train.schedule", SCHEDULES)
    _check_choice(config, "optimizer.state_format", STATE_FORMATS)
    _check_choice(config, "optimizer.block_size", BLOCK_SIZES)
    _check_choice(config, "optimizer.kernel", OPTIMIZER_KERNELS)
    _check_choice(config, "data.source", DATA_SOURCES)
    _check_choice(config, "data.token_dtype", TOKEN_DTYPES)

    mesh = resolve_mesh_shape(config.mesh, num_devices)
    model = config.model
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads: {model.num_kv_heads} must divide model.num_heads={model.num_heads}"
        )
    if model.num_heads % mesh["tensor"]:
        raise ConfigError(f"mesh.tensor: {mesh['tensor']} must divide model.num_heads={model.num_heads}")
    if model.intermediate_size % mesh["tensor"]:
        raise ConfigError(
            f"mesh.tensor: {mesh['tensor']} must divide model.intermediate_size={model.intermediate_size}"
        )
    if config.attention.impl == "pallas" and mesh["tensor"] > 1:
        raise ConfigError(
            "attention.impl: 'pallas' runs whole heads per device and is not split by the compiler; "
            "use mesh.tensor=1 with it, or 'auto'/'xla' with tensor parallelism"
        )
    data_parallel = mesh["replica"] * mesh["data"]
    batch = config.train.batch_size
    if batch % data_parallel:
        raise ConfigError(
            f"train.batch_size: {batch} is not divisible by the data-parallel size "
            f"mesh.replica x mesh.data = {data_parallel}"
        )
    if (batch // data_parallel) % config.train.grad_accum:
        raise ConfigError(
            f"train.grad_accum: {config.train.grad_accum} must divide the per-replica batch "
            f"{batch // data_parallel} (train.batch_size / data-parallel size)"
        )
    _check_sequence_parallel(config, mesh["sequence"])
    if check_paths:
        from efficient_train.data import check_data_config

        try:
            check_data_config(config.data, model.vocab_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return mesh
