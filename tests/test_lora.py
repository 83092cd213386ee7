"""LoRA: adapters train, the base stays frozen, the optimizer holds adapters only, merging is exact,
and adapters shard like their base kernels.

The checkpoint side (a base from `import-hf`, resume, another base refused, merge-lora,
export-hf merged and as PEFT adapters that `peft` loads) is in test_lora_checkpoints.py.
"""
from __future__ import annotations

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_train import cli
from efficient_train.config import ConfigError, validate_fields
from efficient_train.models import Llama, ModelConfig
from efficient_train.models.lora import LoRAConfig, LoRAParam, add_adapters, merge_delta
from efficient_train.parallel.sharding import per_device_bytes
from efficient_train.train.step import make_local_grads
from efficient_train.train.training_setup import build_setup
from efficient_train.tree_paths import leaf_paths
from tests.support.hlo_utils import collectives
from tests.support.lora_setup import fixed_batch, lora_config, mesh_of, train_steps

KERNELS = {"q": "attn/q", "k": "attn/k", "v": "attn/v", "o": "attn/o", "gate": "mlp/gate", "up": "mlp/up",
           "down": "mlp/down"}
N_IN = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


@pytest.mark.parametrize("changes, field", [
    ({"finetune.lora.rank": -1}, "finetune.lora.rank"),
    ({"finetune.lora.dropout": 1.0}, "finetune.lora.dropout"),
    ({"finetune.lora.alpha": 0.0}, "finetune.lora.alpha"),
    ({"finetune.lora.targets": "q,wq"}, "finetune.lora.targets: 'wq' is not a target"),
    ({"finetune.lora.targets": " , "}, "finetune.lora.targets: names no target"),
    ({"finetune.lora.targets": "q,embed"}, "'embed' with model.tie_embeddings=True"),
    ({"finetune.base": ""}, "finetune.base: empty"),
    ({"finetune.lora.rank": 0}, "finetune.base: is set but finetune.lora.rank is 0"),
    ({"finetune.lora.rank": 33}, "finetune.lora.rank: 33 exceeds model.hidden_size=32"),
])
def test_bad_lora_settings_are_one_line_errors(changes, field):
    config = lora_config(**changes)
    with pytest.raises(ConfigError) as error:
        validate_fields(config)
    assert field in str(error.value) and "\n" not in str(error.value)


def test_cli_refuses_a_missing_base_with_one_line(tmp_path, capsys):
    code = cli.main(["train", "--config", "configs/lora_tiny.py", f"--config.finetune.base={tmp_path}/none",
                     f"--workdir={tmp_path}/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: finetune.base:") and "is not a directory" in err and "\n" not in err


def _built(create) -> nnx.Module:
    """The module `create()` returns, initialized by one compiled program (eager init takes seconds)."""
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(create))
        return nnx.merge(graphdef, jax.jit(lambda: nnx.split(create())[1])())


def _llama(cfg: ModelConfig) -> Llama:
    return _built(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


_forward = jax.jit(lambda graphdef, state, ids: nnx.merge(graphdef, state)(ids), static_argnums=0)


def _logits(model: nnx.Module, ids: jax.Array) -> np.ndarray:
    """The model's logits, compiled once per model structure (an eager forward takes seconds)."""
    return np.asarray(_forward(*nnx.split(model), ids))


def _model(targets: str) -> tuple[Llama, LoRAConfig]:
    config = lora_config(targets=targets, **{"model.tie_embeddings": False})
    cfg = ModelConfig.from_config_dict(config.model, attention_impl="xla", norm_impl="xla")
    lora = LoRAConfig.from_config_dict(config.finetune.lora)
    return _built(lambda: add_adapters(Llama(cfg, rngs=nnx.Rngs(0)), lora, jax.random.key(1))), lora


def test_adapters_start_as_peft_does_and_leave_the_model_unchanged():
    model, lora = _model("q,k,v,o,gate,up,down,embed")
    ids = fixed_batch().inputs
    with_adapters = _logits(model, ids)
    adapters = nnx.to_pure_dict(nnx.state(model, LoRAParam))
    q = adapters["blocks"]["attn"]["q"]["lora"]
    assert q["a"].shape == (2, 32, 4) and q["b"].shape == (2, 4, 4, 8)
    assert float(jnp.abs(q["a"]).max()) <= 32 ** -0.5 and float(jnp.abs(q["a"]).min()) > 0  # uniform +-1/sqrt(fan_in)
    assert not np.asarray(q["b"]).any()  # B starts at zero
    embed = adapters["embed"]["lora"]  # PEFT swaps them for the embedding: A zero, B normal
    assert embed["a"].shape == (256, 4) and not np.asarray(embed["a"]).any() and np.asarray(embed["b"]).std() > 0.5
    for path, _ in leaf_paths(adapters):
        assert path.split("/")[-2] == "lora"
    # B = 0 (A = 0 for the embedding) adds exact zeros: the logits are the base's, bit for bit.
    plain = _llama(model.cfg)  # the same base weights: adapters draw from their own key
    np.testing.assert_array_equal(with_adapters, _logits(plain, ids))
    assert lora.scale == 16.0 / 4


def test_merged_kernels_give_the_adapter_forward():
    """W + alpha/rank * A @ B (merge_delta, what merge-lora writes) computes what the adapters compute."""
    model, lora = _model("q,k,v,o,gate,up,down,embed")
    adapters = nnx.state(model, LoRAParam)
    keys = iter(jax.random.split(jax.random.key(2), 64))
    nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters))
    ids = fixed_batch().inputs
    expected = _logits(model, ids)
    trained = nnx.to_pure_dict(nnx.state(model, LoRAParam))
    merged = _llama(model.cfg)
    params = nnx.to_pure_dict(nnx.state(merged, nnx.Param))
    for path in KERNELS.values():
        owner, name = path.split("/")
        adapter = trained["blocks"][owner][name]["lora"]
        kernel = params["blocks"][owner][name]["kernel"]
        params["blocks"][owner][name]["kernel"] = merge_delta(kernel, adapter["a"], adapter["b"], lora.scale)
    params["embed"]["embedding"] = merge_delta(params["embed"]["embedding"], trained["embed"]["lora"]["a"],
                                               trained["embed"]["lora"]["b"], lora.scale)
    nnx.update(merged, params)
    actual = _logits(merged, ids)
    assert np.abs(expected - _logits(_llama(model.cfg), ids)).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


def _dot_output_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):  # scan, remat, custom_vjp bodies
            shapes |= _dot_output_shapes(sub)
    return shapes


@pytest.mark.parametrize("rank", [4, 0])
def test_no_gradient_of_a_base_weight_is_computed(rank):
    """No dot in the differentiated step outputs a base kernel's shape under LoRA (a full fine-tune
    has one per kernel: the control), so the base costs activations' gradients only."""
    config = lora_config(rank=rank)
    setup = build_setup(config, mesh_of({}))
    state = setup.abstract_state
    jaxpr = jax.make_jaxpr(make_local_grads(setup.step_def))(state.params, state.frozen or {}, fixed_batch()).jaxpr
    # One layer's q/o, k/v, gate/up/down kernels and the (tied) embedding, dims in any order.
    kernel_shapes = {(4, 8, 32), (2, 8, 32), (32, 64), (32, 256)}
    found = kernel_shapes & {tuple(sorted(shape)) for shape in _dot_output_shapes(jaxpr)}
    assert (not found) if rank else found == kernel_shapes


@pytest.mark.parametrize("state_format", [pytest.param(f, marks=pytest.mark.slow) for f in ("fp32", "bf16", "int8", "fp8")])
def test_training_moves_adapters_only(state_format):
    # 8-bit formats at rank 32: their blocks run along the last axis, A's rank axis, which needs a block
    # size (32) to divide it.
    config = lora_config(rank=32 if state_format in ("int8", "fp8") else 4, **{"optimizer.state_format": state_format, "optimizer.min_quantized_size": 64,
                                     "optimizer.block_size": 32})
    hlo: list[str] = []
    losses, state, setup, base = train_steps(config, mesh_of({"data": 2}), steps=12, hlo=hlo)
    # The base is bitwise what it was; the loss on the memorized batch falls.
    jax.tree.map(lambda before, after: np.testing.assert_array_equal(before, np.asarray(after)), base, state.frozen)
    assert losses[-1] < losses[0] - 0.5, losses
    # Trained leaves are the adapters alone; every optimizer leaf belongs to one of them.
    adapter_paths = [path for path, _ in leaf_paths(state.params)]
    assert adapter_paths and all("/lora/" in path for path in adapter_paths)
    assert not any("/lora/" in path for path, _ in leaf_paths(state.frozen))
    moment_paths = [path for path, leaf in leaf_paths(state.opt_state) if leaf.ndim > 0]
    assert moment_paths and all("/lora/" in path for path in moment_paths)
    adapter_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))  # global bytes
    opt_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state))
    # ZeRO-1 over data=2: each device holds half of the adapters' optimizer state.
    assert per_device_bytes(state.opt_state, setup.state_shardings.opt_state) < 0.6 * opt_bytes
    counters = sum(leaf.dtype.itemsize for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 0)
    if state_format == "fp32":  # two fp32 moments per adapter weight, plus the step counters
        assert opt_bytes == 2 * adapter_bytes + counters
    else:  # compressed where blocks fit (A's; B of q/k/v has 8 outputs per head and stays fp32)
        assert opt_bytes < 0.7 * (2 * adapter_bytes + counters)
    if state_format in ("int8", "fp8"):
        codes = [path for path, leaf in leaf_paths(state.opt_state) if leaf.dtype == jnp.uint8]
        assert any("attn/q/lora/a" in path for path in codes) and any("mlp/up/lora/b" in path for path in codes)
    assert setup.num_trainable_params * 4 == adapter_bytes
    if state_format == "fp32":  # (a compressed update adds all-reduces of block scales where shards cut blocks)
        # The gradients reduced over data are the adapters' (plus the loss's scalars): the base's never cross.
        all_reduced = sum(math.prod(shape) for c in collectives(hlo[0]) if c.op == "all-reduce" for shape in c.shapes)
        base_params = setup.num_params - setup.num_trainable_params
        assert setup.num_trainable_params <= all_reduced < setup.num_trainable_params + 64 < base_params


def test_adapters_shard_like_their_base_kernels():
    """Under data=2 x tensor=2: A keeps the kernel's input placement, B its output placement, the
    rank axis is never split; ZeRO-3 shards adapters and the frozen base over data as it would the
    parameters of a full fine-tune."""
    mesh = mesh_of({"data": 2, "tensor": 2})
    for stage in (1, 3):
        lora = build_setup(lora_config(zero_stage=stage), mesh)
        full = build_setup(lora_config(rank=0, zero_stage=stage), mesh)
        params, frozen = lora.state_shardings.params, lora.state_shardings.frozen
        full_specs = full.state_shardings.params
        for target, path in KERNELS.items():
            owner, name = path.split("/")
            kernel = tuple(full_specs["blocks"][owner][name]["kernel"].spec)
            assert tuple(frozen["blocks"][owner][name]["kernel"].spec) == kernel  # the base as a full run's
            a = tuple(params["blocks"][owner][name]["lora"]["a"].spec)
            b = tuple(params["blocks"][owner][name]["lora"]["b"].spec)
            n_in = N_IN[target]
            kernel_in, kernel_out = kernel[1:1 + n_in], kernel[1 + n_in:]
            assert a[-1] is None and b[1] is None  # the rank axis: replicated
            if stage == 1:  # tensor placement only
                assert a[1:-1] == kernel_in and b[2:] == kernel_out
            else:  # ZeRO-3 adds data on one non-rank axis, tensor placement kept
                drop = lambda spec: tuple(None if axis == "data" else axis for axis in spec)
                assert drop(a[1:-1]) == drop(kernel_in) and drop(b[2:]) == drop(kernel_out)
                assert "data" in a + b
            assert tuple(lora.plan.leaves["blocks"][owner][name]["lora"]["a"].tensor)[1:-1] == \
                tuple(full.plan.leaves["blocks"][owner][name]["kernel"].tensor)[1:1 + n_in]
        # The optimizer state of an adapter is ZeRO-sharded over data from stage 1 on.
        assert "data" in str(lora.plan.opt_param_specs()["blocks"]["attn"]["q"]["lora"]["a"])


@pytest.mark.slow
def test_losses_on_data2_tensor2_equal_one_device():
    reference = train_steps(lora_config(**{"finetune.lora.dropout": 0.0}), mesh_of({}), steps=4)[0]
    for stage in (1, 3):
        losses = train_steps(lora_config(zero_stage=stage), mesh_of({"data": 2, "tensor": 2}), steps=4)[0]
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=f"zero_stage {stage}")


@pytest.mark.slow
def test_dropout_draws_in_training_only():
    """With dropout the step's loss differs from the dropout-free one; evaluation sees no dropout."""
    from efficient_train.train.step import make_local_loss

    config = lora_config(**{"finetune.lora.dropout": 0.5})
    setup = build_setup(config, mesh_of({}))
    from efficient_train.train.training_setup import init_state

    state = init_state(setup)
    # Give B values so the adapters (and so their dropout) change the output.
    params = jax.tree.map(lambda x: x + 0.5, state.params)
    loss = jax.jit(make_local_loss(setup.step_def))
    batch = fixed_batch()
    plain = loss(params, state.frozen, batch)[0]
    key = jax.random.key(3)
    dropped = loss(params, state.frozen, batch, key)[0]
    again = loss(params, state.frozen, batch, key)[0]
    other = loss(params, state.frozen, batch, jax.random.key(4))[0]
    assert float(dropped) == float(again) and float(dropped) != float(plain) and float(other) != float(dropped)
