"""pallas_kernels.rms_norm: the kernels (run in the Pallas interpreter) against the plain
reference computed in float64, forward and gradients in x and scale; lowering of the GPU
(Triton) and TPU (Mosaic) kernels for their platforms on this CPU machine; the model's
`norm.impl` switch, from the config to the losses of a short training run.

Inputs are random, with a random scale and rows of different magnitudes (so a kernel
that mixed up rows' statistics would show). The interpreter fills the parts of blocks
beyond the arrays with NaN, so a masking bug shows as a non-finite value. Each kernel
case compiles once: one jitted value-and-gradient of a loss with random weights.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import rms_norm
from pallas_kernels.rms_norm import rms_norm_reference

EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: str = "float32"
    scale_dtype: str = "float32"
    out_dtype: str | None = None
    backend: str = "triton"
    block_rows: int | None = None


def _inputs(case: Case, seed: int):
    kx, kr, ks, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
    row_size = jnp.exp(jax.random.normal(kr, (*case.shape[:-1], 1)))  # magnitudes 0.1..10
    x = (jax.random.normal(kx, case.shape) * row_size + 0.3).astype(case.dtype)
    scale = jax.random.normal(ks, case.shape[-1:]).astype(case.scale_dtype)
    weights = jax.random.normal(kw, case.shape, jnp.float32)
    return x, scale, weights


def _loss(norm, x, scale, weights):
    y = norm(x, scale)
    return jnp.sum(y.astype(weights.dtype) * weights), y


def _compile(f, args):
    """jit with XLA's CPU backend optimizations off: compiling the interpreted kernels
    dominates the test time, running them is quick."""
    return jax.jit(f).trace(*args).lower().compile(
        compiler_options={"xla_backend_optimization_level": 0})


def _run_kernel(case: Case, x, scale, weights):
    def norm(x, scale):
        return rms_norm(x, scale, eps=EPS, out_dtype=case.out_dtype, backend=case.backend,
                        interpret=True, block_rows=case.block_rows)

    def f(x, scale, weights):
        return jax.value_and_grad(_loss, argnums=(1, 2), has_aux=True)(norm, x, scale, weights)

    (_, y), grads = _compile(f, (x, scale, weights))(x, scale, weights)
    return y, grads


def _run_reference(x, scale, weights):
    """The reference in float64 on the same (possibly bf16-rounded) inputs."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, scale, weights)]

        def f(x, scale, weights):
            return jax.value_and_grad(_loss, argnums=(1, 2), has_aux=True)(
                lambda x, s: rms_norm_reference(x, s, eps=EPS), x, scale, weights)

        (_, y), grads = _compile(f, args)(*args)
        return np.asarray(y), [np.asarray(g) for g in grads]


def _assert_close(name: str, got, want, rtol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    scale = np.max(np.abs(want))
    assert scale > 0, f"{name}: the reference is all zeros, the case tests nothing"
    err = np.max(np.abs(got - want)) / scale
    assert err <= rtol, f"{name}: max error {err:.2e} of max |ref| (tolerance {rtol:.0e})"


def check(case: Case, seed: int = 0) -> None:
    x, scale, weights = _inputs(case, seed)
    y, (dx, dscale) = _run_kernel(case, x, scale, weights)
    r_y, (r_dx, r_dscale) = _run_reference(x, scale, weights)
    assert y.dtype == jnp.dtype(case.out_dtype or case.dtype) and y.shape == x.shape
    assert dx.dtype == x.dtype and dscale.dtype == scale.dtype
    low = "bfloat16" in (case.dtype, case.scale_dtype, case.out_dtype)
    rtol = 2e-2 if low else 1e-5
    _assert_close("y", y, r_y, rtol)
    _assert_close("dx", dx, r_dx, rtol)
    _assert_close("dscale", dscale, r_dscale, rtol)


# Odd row counts (a partial last block), hidden that is and is not a power of two, 3-D.
@pytest.mark.parametrize("case", [
    Case((1, 64)),
    Case((7, 96)),
    Case((2, 65, 128)),
    Case((130, 128), dtype="bfloat16", scale_dtype="bfloat16"),
    Case((3, 3, 4096), dtype="bfloat16"),
    Case((77, 256), block_rows=32),  # two tiles of 16 rows per program
    Case((9, 200), out_dtype="bfloat16"),
], ids=["1x64", "7x96", "2x65x128", "bf16-130x128", "bf16-3x3x4096", "blocks32-77x256",
        "bf16-out-9x200"])
def test_triton_kernel_matches_reference(case):
    check(case)


@pytest.mark.parametrize("case", [
    Case((7, 96), backend="mosaic_tpu"),
    Case((2, 65, 128), dtype="bfloat16", backend="mosaic_tpu", block_rows=32),
    Case((3, 1, 4096), backend="mosaic_tpu"),
], ids=["7x96", "bf16-blocks32-2x65x128", "3x1x4096"])
def test_tpu_kernel_matches_reference(case):
    check(case)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
@settings(derandomize=True, max_examples=3, deadline=None, database=None)
@given(rows=st.integers(1, 140), hidden=st.sampled_from([64, 96, 128, 200]),
       dtype=st.sampled_from(["float32", "bfloat16"]), block_rows=st.sampled_from([None, 32]))
def test_drawn_shapes(backend, rows, hidden, dtype, block_rows):
    check(Case((rows, hidden), dtype=dtype, backend=backend, block_rows=block_rows),
          seed=rows * 7 + hidden)


def test_xla_backend_is_the_model_norm():
    """The 'xla' backend is the model's RMSNorm bit for bit, and both are the formula."""
    from flax import nnx

    from efficient_train.models.layers import RMSNorm

    x, scale, _ = _inputs(Case((4, 5, 96), dtype="bfloat16"), seed=1)
    with nnx.use_eager_sharding(False):
        norm = RMSNorm(96, eps=EPS, dtype=jnp.bfloat16, param_dtype=jnp.float32, impl="xla")
    norm.scale.set_value(scale)
    y = rms_norm(x, scale, eps=EPS, backend="xla")
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(norm(x), np.float32))
    x64, s64 = np.asarray(x, np.float64), np.asarray(scale, np.float64)
    want = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + EPS) * s64
    _assert_close("y", y, want, 2e-2)


def _primitives(fn, *args) -> set[str]:
    return set(re.findall(r"\b(pallas_call|custom_vjp_call)\b", str(jax.make_jaxpr(fn)(*args))))


def test_backend_selection_and_errors():
    x, s = jnp.ones((3, 64)), jnp.ones((64,))
    assert "pallas_call" in _primitives(lambda x: rms_norm(x, s, interpret=True), x)
    assert "pallas_call" in _primitives(
        lambda x: rms_norm(x, s, backend="mosaic_tpu", interpret=True), x)
    assert "pallas_call" not in _primitives(lambda x: rms_norm(x, s), x)  # auto = xla on CPU
    assert rms_norm(jnp.ones((2, 0, 64)), s, out_dtype=jnp.bfloat16,
                    interpret=True).dtype == jnp.bfloat16  # no rows: no kernel
    with pytest.raises(ValueError, match=r"^backend: 'cuda' is not available; choose one of 'auto', 'triton', 'mosaic_tpu', 'xla'$"):
        rms_norm(x, s, backend="cuda")
    with pytest.raises(ValueError, match="has none"):
        rms_norm(x, s, backend="xla", interpret=True)
    with pytest.raises(ValueError, match="scale must be"):
        rms_norm(x, jnp.ones((32,)))
    with pytest.raises(ValueError, match="power of two"):
        rms_norm(x, s, interpret=True, block_rows=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        rms_norm(jnp.ones((100, 64)), s, backend="mosaic_tpu", interpret=True, block_rows=48)


@pytest.mark.parametrize("platform,backend,marker", [
    ("cuda", "triton", "__gpu$xla.gpu.triton"),
    ("tpu", "mosaic_tpu", "tpu_custom_call"),
])
def test_lowering(platform, backend, marker):
    """Forward and backward kernels lower for the accelerator (not run here)."""
    def forward(x, scale):
        return rms_norm(x, scale, backend=backend)

    def gradient(x, scale):
        return jax.grad(lambda x, s: jnp.sum(forward(x, s).astype(jnp.float32)),
                        argnums=(0, 1))(x, scale)

    for shape, dtype in [((4, 1000, 4096), jnp.bfloat16), ((333, 96), jnp.float32)]:
        x = jax.ShapeDtypeStruct(shape, dtype)
        scale = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
        for fn, kernels in ((forward, 1), (gradient, 2)):
            text = jax.jit(fn).trace(x, scale).lower(lowering_platforms=(platform,)).as_text()
            assert text.count(marker) == kernels, (platform, shape, fn.__name__)


def test_norm_impl_config():
    from efficient_train.checkpoint.metadata import check_model_matches
    from efficient_train.config import ConfigError, get_config, validate
    from efficient_train.models import ModelConfig

    config = get_config()
    assert config.norm.impl == "auto"
    config.norm.impl = "bogus"
    with pytest.raises(ConfigError, match=r"^norm\.impl: 'bogus' is not allowed; choose one of "
                                          r"'auto', 'xla', 'pallas'$"):
        validate(config, 8, check_paths=False)
    model = ModelConfig.from_config_dict(get_config().model, norm_impl="pallas")
    assert model.norm_impl == "pallas"
    with pytest.raises(ValueError, match="model.norm_impl"):
        dataclasses.replace(model, norm_impl="bogus")
    # How the norm is computed is not part of the checkpoint's architecture.
    saved = dataclasses.asdict(model)
    check_model_matches(saved, saved | {"norm_impl": "xla"})


@pytest.mark.slow
def test_training_with_pallas_norm_matches_xla():
    """A few steps of the small model on the 8-device mesh: the kernel in every norm
    (interpreted here) gives the losses of the XLA norm."""
    from tests.support.zero_setup import run_losses

    xla, _ = run_losses({"norm.impl": "xla"}, steps=3)
    pallas, trainer = run_losses({"norm.impl": "pallas"}, steps=3)
    assert trainer.setup.model_config.norm_impl == "pallas"
    assert xla[-1] < xla[0]  # it is learning, so the comparison is not between constants
    np.testing.assert_allclose(pallas, xla, rtol=2e-5)
