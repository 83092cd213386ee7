"""`checkpoint convert`: one checkpoint rewritten for another mesh, state format or dtype.

Any checkpoint already loads on any mesh (arrays are stored in global form), so
conversion is about the things a restore cannot change on the fly:
- layout: arrays are re-chunked to the target mesh's shards (one zarr chunk per
  shard), the layout that loads fastest there;
- optimizer state format (`--state_format`): moments are decoded to fp32 and encoded
  in the new format, one parameter at a time;
- `--drop_optimizer`: a params-only checkpoint (training from it starts fresh moments);
- `--dtype`: parameters cast (e.g. bf16 weights for fine-tuning or serving).

Everything is checked first and every problem is reported together before anything is
written: naming each parameter whose heads or MLP dimension the target's tensor axis
cannot split evenly, besides bad formats, dtypes, device counts and a DST that already
holds steps. Then the state is produced leaf by leaf from the source, each leaf checked
against its fingerprint as it is read (verify.VerifiedReader: a damaged source is
refused, never laundered into a clean-looking copy), and written by writer.py, so
host memory holds one tensor (one parameter's moments when re-encoding), never the
model. The target's structure comes from the same `build_setup` the trainer uses,
abstractly, so the output is exactly what `train` on that mesh restores.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient_train.checkpoint.manager import without_optimizer
from efficient_train.checkpoint.metadata import (
    STATE_LAYOUT_FIELDS,
    CheckpointError,
    CheckpointMetadata,
    DamagedCheckpoint,
    metadata_path,
)
from efficient_train.checkpoint.paths import check_destination, existing_steps_problem, resolve_step
from efficient_train.checkpoint.verify import LeafDamaged, VerifiedReader, read_step_metadata
from efficient_train.checkpoint.writer import write_checkpoint
from efficient_train.config import default_config
from efficient_train.models.choices import DTYPES
from efficient_train.optim.choices import BLOCK_SIZES, STATE_FORMATS
from efficient_train.optim.convert import adam_node
from efficient_train.optim.quant import Quantized, dequantize, quantize_blocks
from efficient_train.parallel.axes import MESH_AXES, ZERO_STAGES
from efficient_train.parallel.sharding import DEFAULT_RULES, indivisible_dims, logical_axes
from efficient_train.tools.report import damaged_step_message, model_config
from efficient_train.tree_paths import leaf_paths

# Logical axes the model needs split evenly under tensor parallelism (config.validate's rule);
# others (kv heads, vocabulary) stay whole when the axis does not divide them, as in training.
MUST_SPLIT = ("heads", "mlp", "experts", "expert_mlp")


def _source_optimizer(metadata: CheckpointMetadata, source: str) -> None:
    """Refuse an optimizer record whose fields this code cannot build a state from."""
    if metadata.optimizer is None:
        return
    defaults = default_config().optimizer
    for key, value in metadata.optimizer.items():
        if key not in defaults:
            continue
        default = defaults[key]
        kind = type(default)
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, kind) and not isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{source}: optimizer.{key}: is {value!r}; allowed: a {kind.__name__} "
                                  f"like the default {default!r}")
    for key, allowed in (("state_format", STATE_FORMATS), ("block_size", BLOCK_SIZES)):
        if key in metadata.optimizer and metadata.optimizer[key] not in allowed:
            raise CheckpointError(f"{source}: optimizer.{key}: is {metadata.optimizer[key]!r}; "
                                  f"allowed: {', '.join(map(str, allowed))}")


def _target_config(metadata: CheckpointMetadata, mesh: dict[str, int], zero_stage: int,
                   optimizer: dict[str, Any] | None, dtype: str | None) -> ml_collections.ConfigDict:
    """The config of the target (or, with the source's optimizer and no dtype, the source).
    Its model and optimizer fields were checked by `model_config` and `_source_optimizer`."""
    config = default_config()
    with config.unlocked():
        for key, value in metadata.model.items():
            if key in config.model:
                config.model[key] = value
        for key, value in (optimizer or {}).items():
            if key in config.optimizer:
                config.optimizer[key] = value
    if dtype is not None:
        config.model.param_dtype = dtype
    config.attention.impl = "xla"
    config.mesh.update(mesh)
    config.zero_stage = zero_stage
    config.seed = metadata.seed
    return config


def _problems(metadata: CheckpointMetadata, config: ml_collections.ConfigDict, *, state_format: str | None,
              drop_optimizer: bool, dtype: str | None) -> list[str]:
    """Every reason the target cannot be written, so all are reported at once."""
    problems = []
    if not metadata.model:
        problems.append("SRC: the checkpoint was saved from a user's own module (no model config); "
                        "convert needs a Llama-family checkpoint")
        return problems
    if config.zero_stage not in ZERO_STAGES:
        problems.append(f"--zero_stage: {config.zero_stage} is not one of {', '.join(map(str, ZERO_STAGES))}")
    if state_format is not None and state_format not in STATE_FORMATS:
        problems.append(f"--state_format: {state_format!r} is not one of {', '.join(STATE_FORMATS)}")
    if state_format is not None and (drop_optimizer or metadata.optimizer is None):
        why = "--drop_optimizer is given" if drop_optimizer else "SRC holds no optimizer state"
        problems.append(f"--state_format: there is no optimizer state to re-encode ({why})")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    needed, available = math.prod(config.mesh[axis] for axis in MESH_AXES), jax.device_count()
    if needed > available:
        problems.append(f"--mesh: {needed} devices needed, this process has {available}")
    from efficient_train.models import Llama, ModelConfig

    shapes_only = dict(config.model.to_dict(), param_dtype="float32")  # shapes do not depend on --dtype
    model_config = ModelConfig.from_config_dict(shapes_only, attention_impl="xla")
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
    mesh_shape = {axis: config.mesh[axis] for axis in MESH_AXES}
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = tuple(variable.get_value().shape)
        for dim, name, axis, size in indivisible_dims(shape, logical_axes(variable), DEFAULT_RULES, mesh_shape):
            if name in MUST_SPLIT:
                problems.append(f"params/{'/'.join(map(str, path))} {list(shape)}: dim {dim} ({name!r} = {shape[dim]}) "
                                f"is not divisible by {axis} = {size}")
    return problems


def _abstract_state(config: ml_collections.ConfigDict) -> Any:
    from efficient_train.parallel.mesh import make_mesh
    from efficient_train.train.training_setup import build_setup

    size = math.prod(config.mesh[axis] for axis in MESH_AXES)
    mesh = make_mesh({axis: config.mesh[axis] for axis in MESH_AXES}, devices=jax.devices()[:size])
    return build_setup(config, mesh).abstract_state


def _names(tree: Any) -> Any:
    """`tree` with each leaf replaced by its checkpoint name."""
    return jax.tree.unflatten(jax.tree.structure(tree), [name for name, _ in leaf_paths(tree)])


def _is_moment(x: Any) -> bool:
    return isinstance(x, (Quantized, str, jax.ShapeDtypeStruct))


def _read_moment(reader: VerifiedReader, names: Any, abstract: Any, second: bool) -> np.ndarray:
    """One stored moment as fp32 (the second moment as v, squared back from sqrt(v))."""
    if not isinstance(names, Quantized):
        return reader.read(names).astype(np.float32)
    exponents = None if names.exponents is None else jnp.asarray(reader.read(names.exponents))
    stored = Quantized(jnp.asarray(reader.read(names.codes)), jnp.asarray(reader.read(names.scales)),
                       exponents, abstract.code, abstract.block)
    value = dequantize(stored)
    return np.asarray(jnp.square(value) if second else value, np.float32)


def _encode_moment(value: np.ndarray, names: Any, abstract: Any, second: bool) -> Iterator[tuple[str, np.ndarray]]:
    if not isinstance(abstract, Quantized):
        yield names, value.astype(abstract.dtype)
        return
    encoded = quantize_blocks(jnp.sqrt(value) if second else jnp.asarray(value), abstract.code, abstract.block)
    yield names.codes, np.asarray(encoded.codes)
    yield names.scales, np.asarray(encoded.scales)
    if names.exponents is not None:
        yield names.exponents, np.asarray(encoded.exponents)


def _reencoded_moments(reader: VerifiedReader, source: Any, target: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Target moment leaves from the source's, one parameter at a time (via fp32)."""
    src_names, tgt_names = adam_node(_names(source)), adam_node(_names(target))
    src_abstract, tgt_abstract = adam_node(source), adam_node(target)
    for second, field in ((False, "mu"), (True, "nu")):
        for src_n, src_a, tgt_n, tgt_a in zip(*(
            jax.tree.leaves(getattr(node, field), is_leaf=_is_moment)
            for node in (src_names, src_abstract, tgt_names, tgt_abstract)
        )):
            yield from _encode_moment(_read_moment(reader, src_n, src_a, second), tgt_n, tgt_a, second)


def _optimizer_leaves(reader: VerifiedReader, metadata: CheckpointMetadata, source: Any,
                      target: Any, same_format: bool) -> Iterator[tuple[str, np.ndarray]]:
    if same_format:
        for name, _ in leaf_paths(target):
            yield name, reader.read(name)
        return
    written = set()
    for name, value in _reencoded_moments(reader, source, target):  # one parameter's moments at a time
        written.add(name)
        yield name, value
    count = reader.read(adam_node(_names(source)).count)
    for name, leaf in leaf_paths(target):
        if name in written:
            continue
        if name in metadata.leaves and tuple(metadata.leaves[name].shape) == tuple(leaf.shape):
            yield name, reader.read(name)
        else:  # a step counter of the target's optimizer chain that the source names differently
            yield name, count.astype(leaf.dtype)


def convert(src: str, dst: str, *, mesh: dict[str, int], zero_stage: int | None = None,
            state_format: str | None = None, drop_optimizer: bool = False, dtype: str | None = None) -> str:
    """Write SRC's newest (or named) step into checkpoint directory DST; returns the new step dir.

    SRC given as a checkpoint directory means its newest committed step, as `train`
    would resume it. Every leaf read from it is checked against its fingerprint as it
    is read; a damaged one stops the write, nothing is left in DST, and the
    DamagedCheckpoint names every damaged leaf convert reads and the older steps the
    user could pass instead. DST must not hold any committed step (tools.py says why);
    the step written is named by the source's validated step number, never by a path.
    """
    step_dir, older = resolve_step(src, "SRC")
    metadata = read_step_metadata(step_dir)
    if metadata.finetune is not None:
        raise CheckpointError(f"SRC: {step_dir} is a LoRA checkpoint (adapters on a base); merge it into a full "
                              "checkpoint first: efficient-train checkpoint merge-lora SRC DST")
    source_path = metadata_path(step_dir)
    source_optimizer = metadata.optimizer
    target_optimizer = None if drop_optimizer or source_optimizer is None else dict(source_optimizer)
    if target_optimizer is not None and state_format is not None:
        target_optimizer["state_format"] = state_format
    stage = metadata.zero_stage if zero_stage is None else zero_stage
    problems = []
    check_destination(dst, "DST")
    existing = existing_steps_problem(dst, "DST")
    if existing:
        problems.append(existing)
    if metadata.model:  # else _problems refuses it
        model_config(metadata, step_dir)
        _source_optimizer(metadata, source_path)
    config = _target_config(metadata, mesh, stage, target_optimizer, dtype)
    problems += _problems(metadata, config, state_format=state_format, drop_optimizer=drop_optimizer, dtype=dtype)
    if problems:
        raise CheckpointError(f"cannot convert {step_dir}: " + "; ".join(problems))

    target = _abstract_state(config)
    source = _abstract_state(_target_config(metadata, mesh, stage, source_optimizer, None))
    read_tree = source if target_optimizer is not None else without_optimizer(source)
    expected = {name: (tuple(leaf.shape), str(leaf.dtype))
                for name, leaf in leaf_paths(source if source_optimizer is not None else without_optimizer(source))}
    saved = {name: (tuple(record.shape), record.dtype) for name, record in metadata.leaves.items()}
    if expected != saved:
        differing = sorted(set(expected) ^ set(saved)) or sorted(n for n in expected if expected[n] != saved[n])
        raise CheckpointError(f"SRC: {step_dir}'s leaves do not match its own model and optimizer config "
                              f"(e.g. {', '.join(differing[:3])})")
    shardings = dict(leaf_paths(jax.tree.map(lambda leaf: leaf.sharding, target)))
    same_format = source_optimizer is not None and target_optimizer is not None and all(
        source_optimizer.get(key) == target_optimizer.get(key) for key in STATE_LAYOUT_FIELDS)
    reader = VerifiedReader(step_dir, metadata)

    def leaves() -> Iterator[tuple[str, jax.Array]]:
        for name in ("step", "skipped_steps"):
            yield name, jax.device_put(reader.read(name), shardings[name])
        for name, leaf in leaf_paths({"params": target.params}):
            yield name, jax.device_put(reader.read(name).astype(leaf.dtype, copy=False), shardings[name])
        if target_optimizer is not None:
            optimizer_leaves = _optimizer_leaves(
                reader, metadata, {"opt_state": source.opt_state}, {"opt_state": target.opt_state}, same_format)
            for name, value in optimizer_leaves:
                yield name, jax.device_put(value, shardings[name])

    model = dict(metadata.model, **({"param_dtype": dtype} if dtype else {}))
    try:
        return write_checkpoint(
            dst, metadata.step, leaves(), model=model,
            optimizer=None if target_optimizer is None else config.optimizer.to_dict(),
            mesh={axis: config.mesh[axis] for axis in MESH_AXES}, zero_stage=stage, seed=metadata.seed,
            data=metadata.data, structure=target if target_optimizer is not None else without_optimizer(target),
        )
    except LeafDamaged:  # the writer has removed what it wrote; name every damaged leaf convert reads
        damaged = reader.damaged(name for name, _ in leaf_paths(read_tree))
        raise DamagedCheckpoint("SRC: " + damaged_step_message(
            step_dir, metadata, damaged, older, "nothing was written to DST")) from None
