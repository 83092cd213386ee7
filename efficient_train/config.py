"""The default configuration, config-file loading, and validation with one-line errors.

Every run is described by one ml_collections ConfigDict. `default_config()` holds every
field that exists (it is also the `tiny` recipe, so the installed package can train
with no config file); files in `configs/` start from it and change what they need.
The dict is locked, so an override of a key that does not exist fails at once.

`validate(config, num_devices)` checks what can be checked before any device work and
raises `ConfigError("<field>: <what is wrong>; <what is allowed>")`; the CLI prints that
one line and exits with status 2. `validate_fields(config)` is the part that needs
neither the device count nor the disk (keys, types, ranges, bounds); the CLI runs it
before anything else, so a bad config touches no file and starts no jax. Only the
data-path check imports jax (through the data package); the mesh arithmetic does not,
so the CLI can size a simulated device count before jax starts.

Decisions:
- Every field's type is the type of its default: an int field takes an int (not a
  bool, not 16.0), a float field an int or a float, and every float must be finite
  (inf and nan are refused by name, whatever the field). A config file that builds
  its own sections is held to the same rule, and a section that lacks a key is refused.
- Bounds that keep a typo from reaching the compiler (where a huge shape aborts XLA
  instead of raising): model dimensions and data.seq_len at most 2**31 - 1 (token ids
  and positions are int32), at most 2**31 - 1 tokens per step (train.batch_size x
  data.seq_len), and a rough count of a step's bytes per device (parameters,
  gradients, Adam moments, activations, attention scores) at most 2**50 (1 PiB, far
  beyond any device; the count is within a small factor of the compiler's own, which
  overflows near 2**63). `seed` lies in [0, 2**32): jax's PRNG keeps 32 bits of it
  (with x64 off), so larger seeds would silently repeat smaller ones.
- A config file that fails to import or whose get_config() raises is reported as one
  line naming the file and the line of it that failed.
"""
from __future__ import annotations

import importlib.util
import linecache
import math
import os
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

import ml_collections

from efficient_train.data import SOURCES as DATA_SOURCES
from efficient_train.data.errors import DataError
from efficient_train.data.eval_sets import parse_eval_sets
from efficient_train.data.sources import TOKEN_DTYPES
from efficient_train.errors import ConfigError, InputError
from efficient_train.models.choices import (
    ATTENTION_IMPLS,
    DTYPES,
    LORA_TARGETS,
    MOE_BALANCE_SCOPES,
    MOE_IMPLS,
    NORM_IMPLS,
    REMAT_POLICIES,
)
from efficient_train.models.llama.config import family_problem, matmul_precision_problem, parameter_count
from efficient_train.optim.choices import BLOCK_SIZES, OPTIMIZER_KERNELS, SCHEDULES, STATE_FORMATS
from efficient_train.parallel.axes import MESH_AXES, SEQUENCE_PARALLEL_MODES, ZERO_STAGES
from efficient_train.parallel.heads import ulysses_head_problem

MAX_DIMENSION = 2**31 - 1  # token ids, positions and dimensions are int32
MAX_TOKENS_PER_STEP = 2**31 - 1
MAX_STEP_BYTES = 2**50  # per device: 1 PiB, far beyond any accelerator
MAX_SEED = 2**32 - 1
# The CPU backend (jax 0.10.2) compiles sharded programs for at most 2048 simulated
# devices (beyond, XLA refuses: "Multiprocess computations aren't implemented"), and
# starting it takes seconds per thousand devices.
MAX_SIMULATED_DEVICES = 2048
WANDB_MODES = ("online", "offline")


def default_config() -> ml_collections.ConfigDict:
    """Every field, with the values of the `tiny` recipe (a ~0.8M-parameter byte-level Llama)."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 0
    c.zero_stage = 1

    c.mesh = ml_collections.ConfigDict(dict(replica=1, data=-1, expert=1, sequence=1, tensor=1))

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
            # Model families (Llama 3, Qwen 2/3, Mistral, Gemma 2/3); see models/llama/config.py.
            rope_type="default",
            rope_factor=1.0,
            rope_original_context=0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_attention_factor=0.0,
            local_rope_theta=0.0,
            qkv_bias=False,
            o_bias=False,
            qk_norm=False,
            sliding_window=0,
            global_every=0,
            activation="silu",
            norm_plus_one=False,
            embed_scale=False,
            sandwich_norms=False,
            query_pre_attn_scalar=0.0,
            attn_softcap=0.0,
            final_softcap=0.0,
            # bf16: the layers' projections in model.dtype; fp8: FP8 GEMMs (models/fp8.py).
            matmul_precision="bf16",
            # Mixture of Experts (num_experts 0: dense); see models/llama/config.py and models/moe.py.
            num_experts=0,
            experts_per_token=2,
            moe_intermediate_size=0,
            shared_experts=0,
            first_dense_layers=0,
            router="softmax_topk",
            norm_topk_prob=True,
            routed_scaling=1.0,
            capacity_factor=0.0,
            router_bias_update=0.0,
            router_groups=0,
            router_topk_groups=0,
        )
    )
    # MoE training (train/moe_balance.py): load-balancing loss coefficient (frequencies over the global
    # batch: every micro-batch and data rank, when balance_scope is "global"; "micro_batch": each
    # micro-batch's own, over the data ranks) and router z-loss coefficient. impl: how a dropless
    # expert layer runs its grouped matmuls (models/choices.MOE_IMPLS).
    c.moe = ml_collections.ConfigDict(dict(aux_loss=0.01, z_loss=0.001, balance_scope="global", impl="auto"))
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
            # The loss over the vocabulary in chunks of this many entries per tensor shard (train/chunked_loss.py):
            # -1 auto (chunked when model.vocab_size >= 32768), 0 whole logits, N > 0 chunks of N.
            loss_chunk=-1,
            # z-loss coefficient (PaLM): z_loss * logsumexp(logits)^2 added per target token; 0 = off.
            z_loss=0.0,
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
            # A tokenizer.json or model directory ("": bytes). On text/jsonl: a token cache in
            # <workdir>/data_cache, prepared on first use; on prepared: must be the one it was made with.
            tokenizer="",
            # source=prepared: "DIR:WEIGHT,DIR:WEIGHT" mixes prepared directories (instead of path).
            mixture="",
        )
    )
    # dir "" = <workdir>/checkpoints; every 0 = only at the end (and on SIGTERM);
    # keep the newest `keep` plus every `keep_every`-th step (0 = none extra).
    c.checkpoint = ml_collections.ConfigDict({"dir": "", "every": 50, "keep": 3, "keep_every": 0, "async_save": True})
    # Evaluation (train/evaluation.py): sets "" = none; "validation" (data.path's validation split),
    # "NAME=DIR[:train]" (a prepared directory's validation or train split), "NAME=SOURCE:PATH" (text, jsonl, tokens),
    # comma-separated. Every `every` steps (0: only at the end) and at the end of the run, `steps`
    # batches of train.batch_size rows per set (0: each set whole).
    c.eval = ml_collections.ConfigDict(dict(sets="", every=0, steps=20))
    # Trackers (train/records.py): TensorBoard event files in <workdir>/tensorboard; Weights & Biases
    # when wandb.project is set (mode "offline" needs no network; `pip install efficient-train[wandb]`).
    c.tracker = ml_collections.ConfigDict(dict(
        tensorboard=True, wandb=ml_collections.ConfigDict(dict(project="", entity="", name="", mode="online"))))
    # A jax.profiler trace of the steps numbered start_step .. start_step + steps - 1 into
    # <workdir>/profile (TensorBoard's profile plugin, Perfetto); steps 0 = no trace.
    c.profile = ml_collections.ConfigDict(dict(start_step=10, steps=0))
    # Samples printed every `every` steps (0: never): `prompt` continued by `max_new_tokens` tokens,
    # with data.tokenizer (bytes when empty); temperature 0 is greedy.
    c.sample = ml_collections.ConfigDict(dict(every=0, prompt="", max_new_tokens=64, temperature=0.0, top_k=0,
                                               top_p=1.0, seed=0))
    # Fine-tuning (models/lora.py, train/finetune.py): `base` is the checkpoint (a directory: its newest
    # step, or a step directory) whose parameters are frozen; LoRA adapters of `rank` (0: none, a full
    # fine-tune) with scale alpha / rank on the comma-separated `targets` (q, k, v, o, gate, up, down, embed)
    # are what trains, dropout on their inputs.
    c.finetune = ml_collections.ConfigDict(dict(
        base="", lora=ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="q,k,v,o,gate,up,down"))))
    c.lock()
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Import a config file and call its `get_config()`; any failure is one ConfigError line."""
    if not os.path.isfile(path):  # os.stat only: a FIFO is refused, never opened
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"config: file {path!r} {what}; pass a path to a configs/*.py file")
    spec = importlib.util.spec_from_file_location(f"_efficient_train_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config: {path!r} cannot be imported; pass a Python file ending in .py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config: {path!r} has no get_config() function")
        config = module.get_config()
    except InputError:
        raise
    except SyntaxError as error:  # the file itself does not parse
        raise ConfigError(f"config: {path!r} line {error.lineno}: syntax error: {_one_line(error.msg)}") from None
    except Exception as error:  # noqa: BLE001 - a user's file may raise anything; report where
        raise ConfigError(f"config: {path!r}{_failing_line(path, error)}: {type(error).__name__}: "
                          f"{_one_line(str(error))}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config: get_config() in {path!r} returned a {type(config).__name__}; it must return an "
                          "ml_collections.ConfigDict (start from efficient_train.config.default_config())")
    return config


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failing_line(path: str, error: BaseException) -> str:
    """' line N (`source`)' of the innermost frame of `error` that ran in the file at `path`."""
    target, found = os.path.realpath(path), None
    tb = error.__traceback__
    while tb is not None:
        if os.path.realpath(tb.tb_frame.f_code.co_filename) == target:
            found = tb.tb_lineno
        tb = tb.tb_next
    if found is None:
        return ""
    source = _one_line(linecache.getline(path, found).strip(), 120)
    return f" line {found} (`{source}`)" if source else f" line {found}"


def get_config(path: str | None = None) -> ml_collections.ConfigDict:
    """The default (`tiny`) config, or the one a config file's `get_config()` returns."""
    return default_config() if path is None else load_config_file(path)


# Old field names that still work on the command line: old -> new. Each use prints one line.
RENAMED_FIELDS = {"checkpoint.async": "checkpoint.async_save"}  # `async` is a Python keyword


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Set dotted fields from strings (`{"mesh.data": "4"}`), parsed to the field's type."""
    for dotted, text in overrides.items():
        if dotted in RENAMED_FIELDS:
            print(f"warning: --config.{dotted} is deprecated; use --config.{RENAMED_FIELDS[dotted]}", file=sys.stderr)
            dotted = RENAMED_FIELDS[dotted]
        *parents, leaf = dotted.split(".")
        node = config
        for i, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise ConfigError(f"{'.'.join(parents[: i + 1])}: unknown config key; known: {_known(node)}")
            node = node[name]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"{dotted}: unknown config key; known: {_known(node)}")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"{dotted}: is a section; set one of its fields: {_known(node[leaf])}")
        value = _parse_like(node[leaf], text, dotted)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as error:  # a type the config file gave the field disagrees
            raise ConfigError(f"{dotted}: cannot set {text!r}: {_one_line(str(error))}") from None


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
            return _parse_int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{field}: cannot read {text!r} as {type(current).__name__}") from None
    return text


def _parse_int(text: str) -> int:
    """An int from "12", "1_000" or an integral "1e6" (exactly, via Decimal)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = Decimal(text.strip().replace("_", ""))
    except InvalidOperation:
        raise ValueError(text) from None
    if not value.is_finite() or value != value.to_integral_value() or abs(value.adjusted()) > 30:
        raise ValueError(text)
    return int(value)


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


def _type_name(reference: Any) -> str:
    if isinstance(reference, bool):
        return "True or False"
    if isinstance(reference, int):
        return "an integer"
    if isinstance(reference, float):
        return "a finite number"
    return "a string" if isinstance(reference, str) else type(reference).__name__


def _same_kind(value: Any, reference: Any) -> bool:
    if isinstance(reference, bool):
        return isinstance(value, bool)
    if isinstance(reference, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(reference, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(reference))


def _is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every key of `reference` is present with a value of its type (floats finite), and no other key."""
    for key in config.keys():
        field = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(f"{field}: unknown config key; known: {_known(reference)}")
    for key in reference.keys():
        field = f"{prefix}{key}"
        if key not in config:
            raise ConfigError(f"{field}: missing from the config; every config has it (default "
                              f"{reference[key]!r}); start from efficient_train.config.default_config()")
        value, default = config[key], reference[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"{field}: must be a section with keys {_known(default)}")
            _check_keys(value, default, prefix=f"{field}.")
        elif not _same_kind(value, default):
            raise ConfigError(f"{field}: {_one_line(repr(value), 80)} is a {type(value).__name__}; it must be "
                              f"{_type_name(default)} (default {default!r})")
        elif isinstance(default, float) and not _is_finite(value):
            raise ConfigError(f"{field}: {value!r} is not finite; it must be a finite number (default {default!r})")


def _check_range(config: ml_collections.ConfigDict, field: str, low: float, high: float,
                 low_open: bool = False, high_open: bool = False) -> None:
    value = _get(config, field)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{field}: {value!r} must lie in {interval}")


def _check_upper(config: ml_collections.ConfigDict, field: str, bound: int, why: str) -> None:
    value = _get(config, field)
    if value > bound:
        raise ConfigError(f"{field}: {value} exceeds the bound {bound} ({why})")


def _check_step_size(config: ml_collections.ConfigDict, mesh: dict[str, int]) -> None:
    """Refuse a step whose rough bytes per device are beyond any device (XLA would abort, not raise)."""
    model, batch, seq_len = config.model, config.train.batch_size, config.data.seq_len
    params = parameter_count(model)
    param_bytes = 16 * params  # fp32 parameters, gradients and two Adam moments, not sharded (an upper bound)
    if param_bytes > MAX_STEP_BYTES:
        raise ConfigError(
            f"model: {params:.3g} parameters need about {param_bytes:.3g} bytes per device for parameters, "
            f"gradients and optimizer state, beyond the bound of 2**50 (1 PiB); make model.vocab_size, "
            f"model.hidden_size, model.intermediate_size or model.num_layers smaller")
    split = mesh["replica"] * mesh["data"] * mesh["expert"] * mesh["sequence"]
    tokens = -(-batch * seq_len // split)  # per device
    e, i, qkv = model.hidden_size, model.intermediate_size, (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    per_token = 4 * (model.num_layers * (4 * e + 3 * i + 2 * qkv + model.num_heads * seq_len) + 3 * model.vocab_size)
    if tokens * per_token > MAX_STEP_BYTES:
        raise ConfigError(
            f"train.batch_size x data.seq_len: {batch} x {seq_len} tokens per step need about "
            f"{tokens * per_token:.3g} bytes of activations per device, beyond the bound of 2**50 (1 PiB); "
            f"lower train.batch_size or data.seq_len, or split the batch over more devices")


def _check_paths(config: ml_collections.ConfigDict) -> None:
    """The work and checkpoint directories, if they exist, are directories (reads no file, writes none)."""
    for field, path in (("workdir", config.workdir), ("checkpoint.dir", config.checkpoint.dir)):
        if not path:
            continue
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{field}: '{path}' exists and is not a directory; give a directory path")


def _check_finetune_base(config: ml_collections.ConfigDict) -> None:
    """finetune.base exists and is not this run's own checkpoint directory (os.stat only)."""
    base = config.finetune.base
    if not os.path.isdir(base):
        raise ConfigError(f"finetune.base: '{base}' is not a directory; give the base checkpoint directory or a step in it")
    own = os.path.abspath(config.checkpoint.dir or os.path.join(config.workdir, "checkpoints"))
    base_dir = os.path.abspath(base)
    if base_dir == own or os.path.dirname(base_dir) == own:
        raise ConfigError(f"finetune.base: '{base}' lies in this run's own checkpoint directory {own}; the LoRA run "
                          "saves its adapters there, so give it another checkpoint.dir or workdir")


def _check_moe_impl(config: ml_collections.ConfigDict, mesh: dict[str, int]) -> None:
    """moe.impl='pallas' needs dropless experts, whole experts per device and 16-aligned sizes."""
    model = config.model
    if config.moe.impl != "pallas":
        return
    why = None
    if not model.num_experts:
        why = "applies to a model with experts (model.num_experts > 0)"
    elif model.capacity_factor:
        why = (f"runs the dropless grouped matmul; model.capacity_factor={model.capacity_factor} dispatches "
               "through a dense buffer instead (set it to 0, or moe.impl to 'auto')")
    elif mesh["tensor"] > 1:
        why = ("runs whole experts per device and is not split by the compiler; use mesh.tensor=1 with it, "
               "or 'auto'/'xla' with tensor parallelism")
    # 16: pallas_kernels.grouped_matmul.MIN_BLOCK, written out because config.py loads without jax.
    elif model.hidden_size % 16 or (model.moe_intermediate_size or model.intermediate_size) % 16:
        why = "needs model.hidden_size and the experts' intermediate size to be multiples of 16"
    if why:
        raise ConfigError(f"moe.impl: 'pallas' {why}")


def _check_mesh_sizes(mesh: ml_collections.ConfigDict) -> dict[str, int]:
    sizes = {axis: mesh[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"mesh.{axis}: {size!r} must be a positive integer or -1 (takes the remaining devices)")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
    return sizes


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with a -1 filled in from the device count; errors name the field."""
    sizes = _check_mesh_sizes(mesh)
    free = [axis for axis, size in sizes.items() if size == -1]
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
    head_problem = ulysses_head_problem(heads, kv_heads, size) if mode == "ulysses" else None
    if head_problem == "num_heads":
        return (f"sequence_parallel.mode: 'ulysses' splits heads over mesh.sequence={size}, which does not "
                f"divide model.num_heads={heads}")
    if head_problem == "num_kv_heads":
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


def validate_fields(config: ml_collections.ConfigDict) -> None:
    """The checks that need neither the device count nor the disk: keys, types, ranges, bounds."""
    _check_keys(config, default_config())
    _check_mesh_sizes(config.mesh)
    if config.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"zero_stage: {config.zero_stage!r} is out of range; allowed 0, 1, 2, 3")
    if not config.workdir.strip():
        raise ConfigError(f"workdir: {config.workdir!r} is empty; give a directory for metrics and checkpoints")
    for field in ("workdir", "checkpoint.dir", "data.path", "data.tokenizer", "data.mixture", "eval.sets"):
        if "\0" in _get(config, field):
            raise ConfigError(f"{field}: {_get(config, field)!r} contains a NUL byte, which no path may hold")
    for field in (
        "model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
        "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.rope_theta", "model.rms_norm_eps",
        "train.steps", "train.batch_size", "train.grad_accum", "train.learning_rate", "train.log_every",
        "train.max_grad_norm", "data.seq_len", "data.max_bytes",
        "optimizer.eps",  # Adam divides by sqrt(v) + eps: with 0, a parameter whose gradient is 0 gets 0/0
    ):
        _check_positive(config, field)
    for field in ("train.warmup_steps", "train.min_lr_ratio", "optimizer.weight_decay",
                  "optimizer.min_quantized_size", "checkpoint.every", "checkpoint.keep", "checkpoint.keep_every",
                  "data.seed", "eval.every", "eval.steps", "profile.steps", "sample.every", "sample.temperature",
                  "sample.top_k", "sample.seed", "train.z_loss"):
        _check_positive(config, field, allow_zero=True)
    for field in ("profile.start_step", "sample.max_new_tokens"):
        _check_positive(config, field)
    _check_choice(config, "tracker.wandb.mode", WANDB_MODES)
    try:
        parse_eval_sets(config.eval.sets)
    except DataError as error:
        raise ConfigError(str(error)) from None
    if config.eval.every and not config.eval.sets.strip():
        raise ConfigError(f"eval.every: {config.eval.every} evaluates no set; name them in eval.sets (e.g. "
                          "'validation' for data.path's validation split) or set eval.every=0")
    _check_finetune(config)
    if config.sample.every and not config.sample.prompt:
        raise ConfigError(f"sample.every: {config.sample.every} needs sample.prompt, the text samples continue")
    _check_range(config, "seed", 0, MAX_SEED)
    _check_range(config, "sample.top_p", 0.0, 1.0, low_open=True)
    _check_range(config, "train.min_lr_ratio", 0.0, 1.0)
    for field in ("optimizer.b1", "optimizer.b2"):
        _check_range(config, field, 0.0, 1.0, high_open=True)
    if config.train.loss_chunk < -1:
        raise ConfigError(f"train.loss_chunk: {config.train.loss_chunk} must be -1 (auto), 0 (whole logits) "
                          "or a chunk width > 0")
    if config.data.eos_id < -1:
        raise ConfigError(f"data.eos_id: {config.data.eos_id} must be -1 (no end-of-document token) or a token id >= 0")
    for field in ("model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
                  "model.num_heads", "model.num_kv_heads", "model.head_dim", "data.seq_len"):
        _check_upper(config, field, MAX_DIMENSION, "2**31 - 1: token ids, positions and dimensions are int32")
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
    _check_choice(config, "moe.balance_scope", MOE_BALANCE_SCOPES)
    _check_choice(config, "moe.impl", MOE_IMPLS)
    for field in ("moe.aux_loss", "moe.z_loss"):
        _check_positive(config, field, allow_zero=True)
    if not config.data.jsonl_field:
        raise ConfigError("data.jsonl_field: '' is empty; name the JSON field that holds each document")

    model = config.model
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads: {model.num_kv_heads} must divide model.num_heads={model.num_heads}"
        )
    if model.head_dim % 2:
        raise ConfigError(f"model.head_dim: {model.head_dim} is odd; rotary embeddings rotate pairs, "
                          "so it must be even")
    problem = family_problem(model) or matmul_precision_problem(model)
    if problem:
        raise ConfigError(problem)
    if model.attn_softcap and config.attention.impl in ("cudnn", "pallas"):
        raise ConfigError(f"attention.impl: {config.attention.impl!r} does not soft-cap attention scores "
                          f"(model.attn_softcap={model.attn_softcap}); use 'xla' or 'auto'")
    tokens = config.train.batch_size * config.data.seq_len
    if tokens > MAX_TOKENS_PER_STEP:
        raise ConfigError(
            f"train.batch_size x data.seq_len: {config.train.batch_size} x {config.data.seq_len} = {tokens} tokens "
            f"per step exceeds the bound {MAX_TOKENS_PER_STEP} (2**31 - 1); lower train.batch_size or data.seq_len")


def _check_finetune(config: ml_collections.ConfigDict) -> None:
    """finetune.lora's bounds and targets; a LoRA run needs finetune.base."""
    lora = config.finetune.lora
    if "\0" in config.finetune.base:
        raise ConfigError(f"finetune.base: {config.finetune.base!r} contains a NUL byte, which no path may hold")
    _check_range(config, "finetune.lora.rank", 0, MAX_DIMENSION)
    _check_range(config, "finetune.lora.dropout", 0.0, 1.0, high_open=True)
    _check_positive(config, "finetune.lora.alpha")
    names = [name.strip() for name in lora.targets.split(",") if name.strip()]
    unknown = [name for name in names if name not in LORA_TARGETS]
    if unknown or (lora.rank and not names):
        wrong = f"{', '.join(map(repr, unknown))} is not a target" if unknown else "names no target"
        raise ConfigError(f"finetune.lora.targets: {wrong}; give comma-separated names from {', '.join(LORA_TARGETS)}")
    if not lora.rank:
        if config.finetune.base:
            raise ConfigError("finetune.base: is set but finetune.lora.rank is 0; a full fine-tune starts from a "
                              "checkpoint in checkpoint.dir, or set finetune.lora.rank > 0 to train adapters on this base")
        return
    if not config.finetune.base:
        raise ConfigError("finetune.base: empty, but finetune.lora.rank > 0; name the base checkpoint the adapters "
                          "train on (a checkpoint directory or one step in it, e.g. from checkpoint import-hf)")
    if "embed" in names and config.model.tie_embeddings:
        raise ConfigError("finetune.lora.targets: 'embed' with model.tie_embeddings=True would also change the tied "
                          "output head once merged; leave 'embed' out for a tied model")
    if lora.rank > config.model.hidden_size:
        raise ConfigError(f"finetune.lora.rank: {lora.rank} exceeds model.hidden_size={config.model.hidden_size}; "
                          "a low-rank update has a rank below the dimensions it adapts")


def validate(config: ml_collections.ConfigDict, num_devices: int, *, check_paths: bool = True) -> dict[str, int]:
    """Check the config against itself and the device count; returns the mesh shape."""
    validate_fields(config)
    mesh = resolve_mesh_shape(config.mesh, num_devices)
    model = config.model
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
    _check_moe_impl(config, mesh)
    if model.num_experts and model.num_experts % mesh["expert"]:
        raise ConfigError(f"mesh.expert: {mesh['expert']} must divide model.num_experts={model.num_experts}")
    if model.num_experts and (model.moe_intermediate_size or model.intermediate_size) % mesh["tensor"]:
        raise ConfigError(f"mesh.tensor: {mesh['tensor']} must divide the experts' intermediate size "
                          f"{model.moe_intermediate_size or model.intermediate_size} (model.moe_intermediate_size)")
    data_parallel = mesh["replica"] * mesh["data"] * mesh["expert"]
    batch = config.train.batch_size
    if batch % data_parallel:
        raise ConfigError(
            f"train.batch_size: {batch} is not divisible by the data-parallel size "
            f"mesh.replica x mesh.data x mesh.expert = {data_parallel}"
        )
    if (batch // data_parallel) % config.train.grad_accum:
        raise ConfigError(
            f"train.grad_accum: {config.train.grad_accum} must divide the per-replica batch "
            f"{batch // data_parallel} (train.batch_size / data-parallel size)"
        )
    _check_sequence_parallel(config, mesh["sequence"])
    _check_step_size(config, mesh)
    if check_paths:
        validate_paths(config)
    return mesh


def validate_paths(config: ml_collections.ConfigDict) -> None:
    """The work and checkpoint directories and the data source's files, by os.stat alone.

    Nothing is opened or created: a FIFO as data.path is refused without blocking on it.
    Imports the data package (and so jax): run it after the simulated device count is set.
    """
    _check_paths(config)
    if config.finetune.lora.rank:
        _check_finetune_base(config)
    from efficient_train.data import check_data_config
    from efficient_train.data.eval_sets import check_eval_sets

    try:
        check_data_config(config.data, config.model.vocab_size)
        check_eval_sets(config.eval.sets, config.data)
    except ValueError as error:
        raise ConfigError(str(error)) from None
