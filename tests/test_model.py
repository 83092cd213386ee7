"""Tests of efficient_train.models: config arithmetic, parameter metadata, the layer
layouts, masking, RoPE, remat, dtypes, attention dispatch and the ZeRO-3 gather hook.

Models are tiny (hidden 64, 2 layers, vocab 256) and every forward is jitted once per
shape, so the file runs in seconds on a CPU with the 8 simulated devices of conftest.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.models import Llama, ModelConfig, rope
from efficient_train.models.attention import attention
from efficient_train.models.layers import apply_rope
from efficient_train.parallel import param_gather

B, S, V = 2, 16, 256
# Every program here is tiny: LLVM's optimisation passes cost more time than they save
# (compiles run 2-3x faster at level 0). Numerics are unaffected; HLO passes still run.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
LOGICAL_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers"}
EXPECTED_AXES = {
    "embed/embedding": ("vocab", "embed"),
    "attn_norm/scale": ("norm",),
    "mlp_norm/scale": ("norm",),
    "attn/q/kernel": ("embed", "heads", "head_dim"),
    "attn/k/kernel": ("embed", "kv_heads", "head_dim"),
    "attn/v/kernel": ("embed", "kv_heads", "head_dim"),
    "attn/o/kernel": ("heads", "head_dim", "embed"),
    "mlp/gate/kernel": ("embed", "mlp"),
    "mlp/up/kernel": ("embed", "mlp"),
    "mlp/down/kernel": ("mlp", "embed"),
    "final_norm/scale": ("norm",),
    "lm_head/kernel": ("embed", "vocab"),
}


def make_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, dtype="float32", param_dtype="float32",
                attention_impl="xla")
    return ModelConfig(**(base | overrides))


def abstract(cfg: ModelConfig) -> Llama:
    """The model with ShapeDtypeStruct values: no mesh, no allocation, no compile."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def build(cfg: ModelConfig, seed: int = 0) -> Llama:
    """The model's own initialisation, in one compiled program (eager init compiles op by op)."""
    with nnx.use_eager_sharding(False):
        state = jit(lambda key: nnx.state(Llama(cfg, rngs=nnx.Rngs(key))))(jax.random.key(seed))
    return nnx.merge(nnx.graphdef(abstract(cfg)), state)


def random_model(cfg: ModelConfig, seed: int = 0) -> Llama:
    """Fresh numpy-random weights (no PRNG compile): kernels ~ N(0, 1/64), norm scales
    ~ 1 + N(0, 0.01) so that every parameter, norms included, has a distinct effect."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract(cfg))
    for path, v in variables(state):
        scale, offset = (0.1, 1.0) if path.endswith("scale") else (0.125, 0.0)
        v.set_value(jnp.asarray(offset + scale * rng.standard_normal(v.shape), v.dtype))
    return nnx.merge(graphdef, state)


def with_weights(cfg: ModelConfig, pure: dict) -> Llama:
    """A model of `cfg` holding the weights of the pure dict `pure`."""
    graphdef, state = nnx.split(abstract(cfg))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def as_loop(scan_model: Llama) -> Llama:
    """A scan_layers=False model holding the same weights as `scan_model`."""
    pure = nnx.to_pure_dict(nnx.state(scan_model))
    stacked = pure["blocks"]
    pure["blocks"] = {i: jax.tree.map(lambda a: np.asarray(a)[i], stacked) for i in range(scan_model.cfg.num_layers)}
    return with_weights(dataclasses.replace(scan_model.cfg, scan_layers=False), pure)


def variant(model: Llama, **overrides) -> Llama:
    """The same weights under a config differing in `overrides` (remat, dtype, ...)."""
    return with_weights(dataclasses.replace(model.cfg, **overrides), nnx.to_pure_dict(nnx.state(model)))


@functools.partial(jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, ids, pos, seg) -> jax.Array:
    return nnx.merge(graphdef, state)(ids, pos, seg)


def forward(model: Llama, ids, pos, seg) -> jax.Array:
    """Jitted logits; models with equal graphdefs share one compilation."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, ids, pos, seg)


def variables(state) -> list[tuple[str, nnx.Variable]]:
    leaves = jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [("/".join(str(getattr(k, "key", k)) for k in path), v) for path, v in leaves]


def batch(rows: int = B, seed: int = 0):
    ids = jax.random.randint(jax.random.key(seed), (rows, S), 0, V, dtype=jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (rows, S))
    seg = jnp.ones((rows, S), jnp.int32)
    return ids, pos, seg


def cross_entropy(logits: jax.Array, ids: jax.Array) -> jax.Array:
    targets = jnp.roll(ids, -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))


ZERO_ROWS = 8  # one row per device of the ZeRO-3 test


@functools.cache
def _model() -> Llama:
    return random_model(make_cfg())


@functools.cache
def reference(scan: bool, remat: str):
    """(loss, logits, grads) of the unsharded model on the ZeRO-3 test's batch.

    Cached: the remat test and the ZeRO-3 test share these compilations."""
    base = _model() if scan else as_loop(_model())
    graphdef, state = nnx.split(variant(base, remat=remat))
    ids, pos, seg = batch(ZERO_ROWS, seed=5)

    def loss_fn(st):
        logits = nnx.merge(graphdef, st)(ids, pos, seg)
        return cross_entropy(logits, ids), logits

    (loss, logits), grads = jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
    return loss, logits, grads


@pytest.fixture(scope="module")
def model() -> Llama:
    return _model()


# --- config, parameter count, metadata ------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scan", [True, False])
def test_num_params_and_flops_match_real_parameters(tied, scan):
    cfg = make_cfg(tie_embeddings=tied, scan_layers=scan, num_layers=3, intermediate_size=96)
    params = variables(nnx.state(abstract(cfg), nnx.Param))
    assert sum(int(np.prod(v.shape)) for _, v in params) == cfg.num_params()
    # Matmul parameters: everything but norm scales and (untied) the lookup table.
    n_matmul = sum(int(np.prod(v.shape)) for p, v in params
                   if not p.endswith("scale") and not (p == "embed/embedding" and not tied))
    attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 128
    assert cfg.flops_per_token(128) == 6 * n_matmul + attn
    assert any(p == "lm_head/kernel" for p, _ in params) == (not tied)


@pytest.mark.parametrize("scan", [True, False])
def test_every_param_has_logical_axes(scan):
    cfg = make_cfg(scan_layers=scan, param_dtype="bfloat16")
    params = variables(nnx.state(abstract(cfg), nnx.Param))
    assert len(params) == 3 + 9 * (1 if scan else cfg.num_layers)
    for path, v in params:
        axes = v.get_metadata()["out_sharding"]
        assert len(axes) == len(v.shape), path
        assert set(axes) <= LOGICAL_NAMES, path
        assert v.dtype == jnp.bfloat16, path
        in_layer = path.startswith("blocks/")
        key = path.split("/", 2)[-1] if (in_layer and not scan) else path.removeprefix("blocks/")
        expected = EXPECTED_AXES[key]
        if in_layer and scan:
            expected = ("layers",) + expected
            assert v.shape[0] == cfg.num_layers, path
        assert tuple(axes) == expected, path


def test_config_from_config_dict():
    cfg = make_cfg(tie_embeddings=True, remat="save_dots")
    cd = ml_collections.ConfigDict(dataclasses.asdict(cfg))
    assert ModelConfig.from_config_dict(cd) == cfg
    assert ModelConfig.from_config_dict(cd, attention_impl="cudnn").attention_impl == "cudnn"
    del cd["attention_impl"], cd["rope_theta"]
    assert ModelConfig.from_config_dict(cd).rope_theta == 10000.0
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_config_dict(ml_collections.ConfigDict(dataclasses.asdict(cfg) | {"heads": 4}))
    with pytest.raises(ValueError, match="missing required keys"):
        ModelConfig.from_config_dict({"vocab_size": 8})
    with pytest.raises(ValueError, match="divisible"):
        make_cfg(num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        make_cfg(remat="some")


# --- layouts and heads ----------------------------------------------------------------

def test_scan_and_loop_compute_the_same_function(model):
    ids, pos, seg = batch()
    out_scan, out_loop = forward(model, ids, pos, seg), forward(as_loop(model), ids, pos, seg)
    assert out_scan.shape == (B, S, V) and out_scan.dtype == jnp.float32
    np.testing.assert_allclose(out_scan, out_loop, rtol=1e-5, atol=1e-5)
    # Not vacuous: the loop model really runs its own weights (layer 1 scaled here).
    pure = nnx.to_pure_dict(nnx.state(as_loop(model)))
    pure["blocks"][1]["mlp"]["down"]["kernel"] = 2 * pure["blocks"][1]["mlp"]["down"]["kernel"]
    changed = forward(with_weights(dataclasses.replace(model.cfg, scan_layers=False), pure), ids, pos, seg)
    assert not np.allclose(changed, out_loop, atol=1e-3)


def test_tied_embeddings_reuse_the_table():
    tied = random_model(make_cfg(tie_embeddings=True))
    assert tied.lm_head is None
    pure = nnx.to_pure_dict(nnx.state(tied))
    pure["lm_head"] = {"kernel": pure["embed"]["embedding"].T}
    untied = with_weights(make_cfg(tie_embeddings=False), pure)
    assert untied.lm_head.kernel.shape == (64, V)
    ids, pos, seg = batch()
    out = forward(tied, ids, pos, seg)
    assert out.shape == (B, S, V)
    np.testing.assert_allclose(out, forward(untied, ids, pos, seg), rtol=1e-5, atol=1e-5)


def test_initialisation_gives_unit_scale_logits():
    model = build(make_cfg())
    params = dict(variables(nnx.state(model, nnx.Param)))
    q = np.asarray(params["blocks/attn/q/kernel"].get_value())
    assert not np.allclose(q[0], q[1])  # layers are initialised independently
    np.testing.assert_allclose(q.std(), 64 ** -0.5, rtol=0.1)
    np.testing.assert_array_equal(params["final_norm/scale"].get_value(), 1.0)
    ids, pos, seg = batch()
    logits = forward(model, ids, pos, seg)
    assert 0.3 < float(jnp.std(logits)) < 3.0
    assert abs(float(cross_entropy(logits, ids)) - np.log(V)) < 1.0


def naive_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    """float64 reference: repeat kv heads, loop over batch and heads, explicit mask."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        allowed = ((q_seg[b][:, None] == kv_seg[b][None, :]) & (kv_seg[b][None, :] != 0)
                   & (kv_pos[b][None, :] <= q_pos[b][:, None]))
        for h in range(q.shape[2]):
            scores = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
            scores = np.where(allowed, scores, -np.inf)
            for i in range(q.shape[1]):
                if allowed[i].any():
                    p = np.exp(scores[i] - scores[i].max())
                    out[b, i, h] = (p / p.sum()) @ v[b, :, h]
    return out


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_matches_repeated_kv_reference(kv_heads):
    rng = np.random.default_rng(kv_heads)
    q = rng.standard_normal((2, 12, 4, 8), np.float32)
    k, v = (rng.standard_normal((2, 12, kv_heads, 8), np.float32) for _ in range(2))
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
    pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(12))], np.int32)
    run = jit(attention, static_argnames=("impl", "causal"))
    out = run(q, k, v, segment_ids=seg, positions=pos, impl="xla")
    np.testing.assert_allclose(out, naive_attention(q, k, v, seg, seg, pos, pos), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[0, 9:] == 0)  # padding queries output zeros
    # Keys given separately (as sequence parallelism will): the last 6 queries against
    # all 12 keys equal the corresponding rows of full self-attention.
    part = run(q[:, 6:], k, v, segment_ids=seg[:, 6:], positions=pos[:, 6:],
               kv_segment_ids=seg, kv_positions=pos, impl="xla")
    np.testing.assert_allclose(part, out[:, 6:], rtol=1e-5, atol=1e-5)


ATTENTION_MODULE = importlib.import_module("efficient_train.models.attention")  # the package exports the function
CUDNN_TARGET = "__cudnn$fmha"  # jax's cuDNN attention custom calls: ...Softmax (forward), ...SoftmaxBackward


def _attention_program(impl: str, dtype, platform: str) -> tuple[str, str]:
    """(jaxpr, text lowered for `platform`) of attention's forward and backward."""
    q = jax.ShapeDtypeStruct((2, 16, 4, 64), dtype)
    kv = jax.ShapeDtypeStruct((2, 16, 2, 64), dtype)
    seg = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, segment_ids=seg, impl=impl).astype(jnp.float32))

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg)
    return str(traced.jaxpr), traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.fixture
def on_nvidia_gpu(monkeypatch):
    """attention() believes it runs on an NVIDIA GPU, and jax's cuDNN call finds a cuDNN
    (9.10) to check its shapes against, so programs lower for CUDA on this CPU."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(ATTENTION_MODULE, "_on_nvidia_gpu", lambda: True)
    monkeypatch.setattr(fused_attention_stablehlo, "cuda_versions", types.SimpleNamespace(cudnn_get_version=lambda: 91000))


def test_attention_dispatch_on_cpu():
    """Each impl is in the program it builds: 'auto' on a CPU is exactly 'xla''s program,
    'pallas' holds the Pallas kernel (interpreted here), neither holds a cuDNN call."""
    xla_jaxpr, xla_text = _attention_program("xla", jnp.bfloat16, "cpu")
    auto_jaxpr, _ = _attention_program("auto", jnp.bfloat16, "cpu")
    pallas_jaxpr, _ = _attention_program("pallas", jnp.float32, "cpu")
    assert auto_jaxpr == xla_jaxpr
    assert "pallas_call" not in xla_jaxpr and CUDNN_TARGET not in xla_text
    assert pallas_jaxpr.count("pallas_call") == 3  # the kernels: forward, dq, dkv
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU backend"):
        attention(q, q, q, segment_ids=seg, impl="cudnn")
    with pytest.raises(ValueError, match="must be one of"):
        attention(q, q, q, segment_ids=seg, impl="flash")


def test_attention_dispatch_on_gpu(on_nvidia_gpu):
    """Lowered for CUDA (here, on the CPU): 'cudnn' and, for bf16, 'auto' call cuDNN's
    fused attention forward and backward; 'xla' and fp32 'auto' do not; 'cudnn' refuses
    fp32 instead of falling back."""
    for impl, dtype, cudnn in [("cudnn", jnp.bfloat16, True), ("auto", jnp.bfloat16, True),
                               ("auto", jnp.float32, False), ("xla", jnp.bfloat16, False)]:
        jaxpr, text = _attention_program(impl, dtype, "cuda")
        calls = set(re.findall(re.escape(CUDNN_TARGET) + r"\w*", text))
        assert len(calls) == (2 if cudnn else 0), (impl, dtype, calls)
        assert "pallas_call" not in jaxpr
    with pytest.raises(ValueError, match="needs bf16 or fp16"):
        _attention_program("cudnn", jnp.float32, "cuda")


# --- masking and positions ------------------------------------------------------------

def test_segments_isolate_documents_and_ignore_padding(model):
    run = functools.partial(forward, model)
    ids, _, _ = batch()
    seg = jnp.array([[1] * 6 + [2] * 7 + [0] * 3] * B, jnp.int32)
    pos = jnp.array([list(range(6)) + list(range(7)) + [0] * 3] * B, jnp.int32)
    base = run(ids, pos, seg)
    assert np.isfinite(base).all()
    other_doc = run(ids.at[:, 6:13].set((ids[:, 6:13] + 1) % V), pos, seg)
    np.testing.assert_allclose(other_doc[:, :6], base[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(other_doc[:, 6:13], base[:, 6:13], atol=1e-3)
    padding = run(ids.at[:, 13:].set((ids[:, 13:] + 1) % V), pos, seg)
    np.testing.assert_allclose(padding[:, :13], base[:, :13], rtol=1e-6, atol=1e-6)
    # The second document gives the same logits when it starts its own row.
    alone = ids.at[:, :7].set(ids[:, 6:13])
    alone_seg = jnp.array([[1] * 7 + [0] * 9] * B, jnp.int32)
    alone_pos = jnp.array([list(range(7)) + [0] * 9] * B, jnp.int32)
    np.testing.assert_allclose(run(alone, alone_pos, alone_seg)[:, :7], base[:, 6:13],
                               rtol=1e-5, atol=1e-5)


def test_causal(model):
    ids, pos, seg = batch()
    t = 9
    base = forward(model, ids, pos, seg)
    changed = forward(model, ids.at[:, t].set((ids[:, t] + 7) % V), pos, seg)
    np.testing.assert_allclose(changed[:, :t], base[:, :t], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, t:], base[:, t:], atol=1e-3)


def test_rope_scores_depend_only_on_position_difference(model):
    rng = np.random.default_rng(0)
    d = 16
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, d), np.float32)) for _ in range(2))

    plain = ModelConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=1,
                        num_kv_heads=1, head_dim=d)

    def score(m: int, n: int) -> float:
        qr = apply_rope(q, *rope.angles(plain, jnp.array([[m]])))
        kr = apply_rope(k, *rope.angles(plain, jnp.array([[n]])))
        return float(jnp.sum(qr * kr))

    for m, n in [(3, 1), (10, 10), (7, 12), (40, 2)]:
        for shift in (1, 17, 300):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-4, abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    # Model level: shifting every position of a document leaves its logits unchanged.
    ids, pos, seg = batch()
    run = functools.partial(forward, model)
    np.testing.assert_allclose(run(ids, pos + 5, seg), run(ids, pos, seg), rtol=1e-4, atol=1e-4)
    assert not np.allclose(run(ids, pos[:, ::-1], seg), run(ids, pos, seg), atol=1e-3)


# --- remat and dtypes -----------------------------------------------------------------

@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_remat_policies_give_identical_loss_and_grads(scan):
    loss, _, grads = reference(scan, "none")
    assert np.isfinite(loss) and loss > 0
    for policy in ("full", "save_dots"):
        other_loss, _, other_grads = reference(scan, policy)
        # Recomputation replays the same ops: bitwise equal, not merely close.
        assert np.array_equal(other_loss, loss), policy
        for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads), strict=True):
            assert np.array_equal(a, b), policy


def test_bf16_compute_close_to_fp32(model):
    ids, pos, seg = batch()
    ref, out = forward(model, ids, pos, seg), forward(variant(model, dtype="bfloat16"), ids, pos, seg)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    # Measured about 1e-2 (bf16 has an 8-bit mantissa); fp32 compute would be ~1e-7.
    assert 1e-3 < rel < 3e-2


# --- ZeRO-3 ---------------------------------------------------------------------------

def zero3_specs(state, n: int) -> nnx.State:
    """Mark every non-norm Param's largest dim divisible by n (never the layer axis) as
    its `zero_dim` and return the matching PartitionSpecs; norms stay replicated, which
    covers the no-`zero_dim` path of the gather."""

    def spec(v: nnx.Variable) -> P:
        axes = v.get_metadata()["out_sharding"]
        if axes[-1] == "norm":
            return P()
        shape = v.get_value().shape
        first = 1 if axes[0] == "layers" else 0
        dim = max((d for d in range(first, len(shape)) if shape[d] % n == 0), key=lambda d: shape[d])
        v.set_metadata("zero_dim", dim)
        return P(*("data" if i == dim else None for i in range(len(shape))))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.mark.parametrize("scan", [True, False])
def test_zero3_gather_matches_unsharded(scan):
    """ZeRO-3 via param_gather inside shard_map equals the unsharded model, forward and
    gradient, and the compiled step states its all-gathers and reduce-scatters."""
    base = variant(_model() if scan else as_loop(_model()), remat="full")
    graphdef, state = nnx.split(base)
    ids, pos, seg = batch(ZERO_ROWS, seed=5)
    ref_loss, ref_logits, ref_grads = reference(scan, "full")

    mesh = jax.make_mesh((ZERO_ROWS,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = zero3_specs(state, ZERO_ROWS)
    sharded = jax.device_put(state, jax.tree.map(lambda p: NamedSharding(mesh, p), specs))
    assert {type(v.get_metadata().get("zero_dim")) for _, v in variables(sharded)} == {int, type(None)}

    def local_forward(st, ids, pos, seg):
        with param_gather.gathering(("data",)):
            return nnx.merge(graphdef, st)(ids, pos, seg)

    sharded_forward = jax.shard_map(
        local_forward, mesh=mesh, in_specs=(specs, P("data"), P("data"), P("data")),
        out_specs=P("data"), axis_names={"data"}, check_vma=False)

    def loss_fn(st):
        logits = sharded_forward(st, ids, pos, seg)
        return cross_entropy(logits, ids), logits

    step = jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(sharded).compile()
    hlo = step.as_text()
    assert "all-gather" in hlo and "reduce-scatter" in hlo
    (loss, logits), grads = step(sharded)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)

    ref_by_path = dict(variables(ref_grads))
    for path, g in variables(grads):
        value, ref = g.get_value(), np.asarray(ref_by_path[path].get_value())
        dim = g.get_metadata().get("zero_dim")
        for shard in value.addressable_shards:
            if dim is not None:  # each device holds only its 1/n slice of the gradient
                assert shard.data.shape[dim] == ref.shape[dim] // ZERO_ROWS, path
            np.testing.assert_allclose(shard.data, ref[shard.index], rtol=1e-4,
                                       atol=1e-5 * np.abs(ref).max(), err_msg=path)


def test_pallas_attention_equals_xla_with_segments_padding_and_gqa():
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(2, 24, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 24, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 24, 2, 16)), jnp.float32)
    seg = jnp.asarray([[1] * 10 + [2] * 11 + [0] * 3, [1] * 24], jnp.int32)
    pos = jnp.asarray([list(range(10)) + list(range(11)) + [0] * 3, list(range(24))], jnp.int32)

    def loss(impl, q, k, v):
        out = attention(q, k, v, segment_ids=seg, positions=pos, impl=impl)
        return jnp.sum(out * jnp.cos(out)), out

    (_, xla_out), xla_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, pallas_out), pallas_grads = jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(pallas_out, xla_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(pallas_grads, xla_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_model_choice_literals_spell_the_choice_tuples():
    """models/llama/config.py's Literal types repeat models/choices.py's allowed names for type checkers only."""
    import typing

    from efficient_train.models import choices
    from efficient_train.models.llama import config as model_config

    assert typing.get_args(model_config.RematPolicy) == choices.REMAT_POLICIES
    assert typing.get_args(model_config.AttentionImpl) == choices.ATTENTION_IMPLS
    assert typing.get_args(model_config.NormImpl) == choices.NORM_IMPLS
    assert typing.get_args(model_config.DTypeName) == choices.DTYPES
    assert typing.get_args(model_config.RopeType) == choices.ROPE_TYPES
    assert typing.get_args(model_config.Activation) == choices.ACTIVATIONS
    assert typing.get_args(model_config.MatmulPrecision) == choices.MATMUL_PRECISIONS


def test_sliding_window_model_runs_the_pallas_kernel_with_a_traced_window():
    """Gemma-style local/global layers in one scan: the Pallas kernel is in the program, and
    the window reaches it as a scanned value (a window of 0 on the global layer)."""
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, dtype="float32", sliding_window=4, global_every=2, attention_impl="pallas")
    assert cfg.layer_windows() == (4, 0)
    with nnx.use_eager_sharding(False):
        model = Llama(cfg, rngs=nnx.Rngs(0))
    jaxpr = str(jax.make_jaxpr(lambda ids: model(ids))(jnp.zeros((1, 16), jnp.int32)))
    assert "pallas_call" in jaxpr and "scan" in jaxpr


@pytest.mark.parametrize("changes, field", [
    ({"rope_type": "ntk"}, "model.rope_type"),
    ({"rope_type": "llama3", "rope_factor": 8.0}, "model.rope_original_context"),
    ({"global_every": 2}, "model.global_every"),
    ({"sliding_window": -1}, "model.sliding_window"),
    ({"activation": "relu"}, "model.activation"),
    ({"attn_softcap": float("nan")}, "model.attn_softcap"),
])
def test_bad_family_fields_are_one_line_config_errors(changes, field):
    from efficient_train.config import ConfigError, default_config, validate_fields

    config = default_config()
    config.model.update(changes)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as error:
        validate_fields(config)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig(**{**dataclasses.asdict(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                                num_layers=1, num_heads=1, num_kv_heads=1,
                                                                head_dim=8)), **changes})


def test_pallas_attention_refuses_soft_capping_by_field():
    from efficient_train.config import ConfigError, default_config, validate

    config = default_config()
    config.model.attn_softcap = 50.0
    config.attention.impl = "pallas"
    with pytest.raises(ConfigError, match="attention.impl: 'pallas' does not soft-cap"):
        validate(config, 1, check_paths=False)
