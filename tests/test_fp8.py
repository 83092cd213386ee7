"""FP8 matmuls (models/fp8.py, `model.matmul_precision='fp8'`).

The program handed to XLA multiplies float8 operands (E4M3 forward, E5M2 gradients) in
every decoder projection and in nothing else, and none at all under 'bf16'; the product
and its gradients are within FP8 error of the exact ones; the scales follow each tensor
(current scaling); bad combinations are refused in one line; and (slow) 300 steps of the
tiny model end within 1% of the bf16 loss.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_train.config import validate, validate_fields
from efficient_train.errors import ConfigError
from efficient_train.models import Llama, ModelConfig, fp8
from efficient_train.parallel.mesh import make_mesh
from efficient_train.train.training_setup import build_setup
from tests.support.subprocess_env import subprocess_env
from tests.support.zero_setup import small_config

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def test_current_scaling_follows_each_tensor() -> None:
    x = jax.random.normal(jax.random.key(0), (64, 32))
    codes, scale = fp8.quantize(x, jnp.float8_e4m3fn)
    assert codes.dtype == jnp.float8_e4m3fn
    assert float(scale) == pytest.approx(float(jnp.abs(x).max()) / E4M3_MAX, rel=1e-6)
    assert float(jnp.abs(codes.astype(jnp.float32)).max()) == E4M3_MAX  # the amax lands on the largest code
    louder_codes, louder_scale = fp8.quantize(x * 1024.0, jnp.float8_e4m3fn)  # a spike: the scale follows it at once
    assert float(louder_scale) == pytest.approx(1024.0 * float(scale), rel=1e-6)
    np.testing.assert_array_equal(np.asarray(louder_codes.astype(jnp.float32)), np.asarray(codes.astype(jnp.float32)))
    grad_codes, grad_scale = fp8.quantize(x * 1e-6, jnp.float8_e5m2)
    assert grad_codes.dtype == jnp.float8_e5m2
    assert float(grad_scale) == pytest.approx(1e-6 * float(jnp.abs(x).max()) / E5M2_MAX, rel=1e-6)
    assert float(fp8.quantize(jnp.zeros(4), jnp.float8_e4m3fn)[1]) == 1.0


def relative_error(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_product_and_gradients_within_fp8_error() -> None:
    x = jax.random.normal(jax.random.key(0), (8, 16, 64), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (64, 4, 32)) * 0.05  # fp32 master weights, a q-like kernel

    def fp8_loss(x, w):
        y = fp8.matmul(x, w, 1, jnp.bfloat16).astype(jnp.float32)
        return jnp.sum(y * jnp.sin(y)), y

    def exact_loss(x, w):
        y = jnp.einsum("bse,ehd->bshd", x.astype(jnp.float32), w, precision="highest")
        return jnp.sum(y * jnp.sin(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(fp8_loss, argnums=(0, 1), has_aux=True))(x, w)
    (_, y_exact), grads_exact = jax.value_and_grad(exact_loss, argnums=(0, 1), has_aux=True)(x, w)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32  # master weights keep fp32 gradients
    # E4M3 has 3 mantissa bits, E5M2 2. Measured: 0.038 forward, 0.046 / 0.047 for dx / dw; the
    # bf16 product is at 0.0024 / 0.0029 / 0.0026, so the lower bound also proves FP8 ran.
    assert 0.01 < relative_error(y, y_exact) < 0.06
    assert 0.01 < relative_error(grads[0], grads_exact[0]) < 0.08
    assert 0.01 < relative_error(grads[1], grads_exact[1]) < 0.08


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**(dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=16, dtype="bfloat16", attention_impl="xla") | overrides))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(\S+) = (\S+?)\[")
_DOT = re.compile(r"= \S+ dot\((\S+), (\S+)\)")


def dot_operand_types(hlo: str) -> collections.Counter:
    """Counter of (lhs type, rhs type) over every dot of an HLO module's text."""
    types = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, hlo.splitlines()) if m}
    return collections.Counter((types[a], types[b]) for a, b in _DOT.findall(hlo))


def train_step_hlo(cfg: ModelConfig) -> str:
    """The HLO (before XLA's optimizations: what every backend receives) of loss and gradients."""
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, 16), jnp.int32)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(tokens))

    return jax.jit(jax.grad(loss)).lower(params).compiler_ir("hlo").as_hlo_text()


@pytest.mark.parametrize("tied,remat", [(True, "none"), (False, "save_dots")])
def test_hlo_has_fp8_dots_where_configured(tied: bool, remat: str) -> None:
    e4m3, e5m2 = "f8e4m3fn", "f8e5m2"
    dots = dot_operand_types(train_step_hlo(tiny(matmul_precision="fp8", tie_embeddings=tied, remat=remat)))
    # One scanned layer body: q, k, v, o, gate, up, down forward as E4M3 x E4M3, and each
    # one's two backward GEMMs with the E5M2 gradient. Under save_dots too: the FP8 operands
    # are the saved residuals, so no forward GEMM is recomputed (remat 'full' has 13).
    assert dots[(e4m3, e4m3)] == 7
    assert dots[(e5m2, e4m3)] == 7  # dx = dy . w^T
    assert dots[(e4m3, e5m2)] == 7  # dw = x^T . dy
    # The output head and attention stay in the compute dtype.
    assert all("f8" not in a and "f8" not in b for a, b in dots if (a, b) not in
               {(e4m3, e4m3), (e5m2, e4m3), (e4m3, e5m2)})
    assert sum(n for (a, b), n in dots.items() if "bf16" in a + b) > 0
    bf16_hlo = train_step_hlo(tiny(tie_embeddings=tied, remat=remat))
    assert "f8e" not in bf16_hlo


def config_with(**model) -> object:
    config = small_config()
    config.model.update({"dtype": "bfloat16", **model})
    return config


@pytest.mark.parametrize("model,message", [
    (dict(matmul_precision="fp16"), r"^model\.matmul_precision: 'fp16' is not one of 'bf16', 'fp8'$"),
    (dict(matmul_precision="fp8", dtype="float32"),
     r"^model\.matmul_precision: 'fp8' needs model\.dtype='bfloat16' \(got 'float32'\)$"),
    (dict(matmul_precision="fp8", intermediate_size=136),
     r"^model\.matmul_precision: 'fp8' GEMMs need multiples of 16; intermediate_size=136 are not$"),
])
def test_bad_combinations_refused_in_one_line(model, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_fields(config_with(**model))
    with pytest.raises(ConfigError, match=message):
        tiny(**model)


def test_fp8_refused_for_a_custom_model() -> None:
    config = config_with(matmul_precision="fp8")
    mesh = make_mesh(validate(config, jax.device_count(), check_paths=False))
    with nnx.use_eager_sharding(False):
        model = Llama(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"^model\.matmul_precision: 'fp8' applies to the built-in Llama only"):
        build_setup(config, mesh, model=model, loss_fn=lambda m, b: jnp.zeros(()))


def final_loss(precision: str, seed: int, steps: int) -> float:
    """Mean loss of the last 20 of `steps` steps of the tiny recipe in bf16 compute (one device)."""
    from efficient_train import Trainer, get_config

    config = get_config()
    config.model.update(dtype="bfloat16", matmul_precision=precision)
    config.mesh.data = 1
    config.train.update(steps=steps, warmup_steps=30)
    config.seed = seed
    config.checkpoint.every = 0
    config.tracker.tensorboard = False
    config.workdir = tempfile.mkdtemp(prefix=f"efficient_train_fp8_{precision}_")  # fresh: nothing to resume
    trainer = Trainer(config)
    losses = [float(trainer.step()["loss"]) for _ in range(steps)]
    return float(np.mean(losses[-20:]))


@pytest.mark.slow
def test_fp8_training_ends_within_one_percent_of_bf16() -> None:
    """300 steps of the tiny recipe (byte-level text) in bf16 and in FP8, same seed and data, on
    one device (a process of its own). Measured over seeds 0, 1, 2 (BENCHMARKS.md): FP8 / bf16
    final loss 1.0063, 1.0044, 1.0090, while bf16 alone spreads 1.2% across those seeds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from tests.test_fp8 import final_loss; print(final_loss('bf16', 0, 300), final_loss('fp8', 0, 300))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=subprocess_env(1), capture_output=True,
                         text=True, check=True)
    bf16, fp8_loss = map(float, out.stdout.split()[-2:])
    assert abs(fp8_loss / bf16 - 1.0) < 0.01, (fp8_loss, bf16)
