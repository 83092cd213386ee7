"""The fused AdamW Pallas kernel: equal bit for bit to the XLA path in interpret mode on
CPU, for every block format, both outputs (new params, updates), both launch layouts
(Triton's, Mosaic TPU's) and tiles that do not divide the blocks; and it lowers for
CUDA and TPU on this CPU machine (`.trace(...).lower(lowering_platforms=...)`), which
catches most breakage without an accelerator. (Optimizer-level equality, under
shard_map on several meshes, is in test_optim_sharding.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_adamw import Hyper, Scalars, fused_adamw, reference

FORMATS = {
    "int8": (reference.TAPERED8_SIGNED, reference.TAPERED8_UNSIGNED),
    "fp8": (reference.E4M3X_SIGNED, reference.E4M3X_UNSIGNED),
    "int4": (reference.TAPERED4_SIGNED, reference.TAPERED4_UNSIGNED),
}
HYPER = Hyper(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.1)
BLOCKS, BLOCK = 40, 256  # 40 blocks: tiles of 16 (Triton) and 32 (TPU) leave a partial tile


def _inputs(state_format: str, seed: int = 0):
    m_code, v_code = FORMATS[state_format]
    rng = np.random.default_rng(seed)
    g = jnp.asarray(rng.normal(size=(BLOCKS, BLOCK)) * np.exp(rng.normal(size=(BLOCKS, 1))), jnp.float32)
    p = jnp.asarray(rng.normal(size=(BLOCKS, BLOCK)) * 0.02, jnp.float32)
    m = reference.encode(reference.split(0.3 * g, m_code), m_code)
    v = reference.encode(reference.split(0.05 * jnp.abs(g) + 1e-3, v_code), v_code)
    scalars = Scalars(jnp.float32(-1e-3), jnp.float32(1 - 0.9**7), jnp.float32(1 - 0.999**7))
    return g, p, m, v, scalars, m_code, v_code


def _call(backend: str, emit_params: bool, interpret: bool, m_code, v_code):
    def run(g, p, m, v, scalars):
        return fused_adamw(g, p, m, v, scalars, m_code=m_code, v_code=v_code, hyper=HYPER, emit_params=emit_params,
                           backend=backend, interpret=interpret)

    return jax.jit(run)


def _bitwise_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("state_format", sorted(FORMATS))
def test_interpreted_kernel_equals_xla_path(state_format):
    g, p, m, v, scalars, m_code, v_code = _inputs(state_format)
    for backend, emit_params in (("triton", True), ("mosaic_tpu", False)):
        expected = _call("xla", emit_params, False, m_code, v_code)(g, p, m, v, scalars)
        got = _call(backend, emit_params, True, m_code, v_code)(g, p, m, v, scalars)
        assert _bitwise_equal(got, expected), (backend, emit_params)
    new_params, new_m, new_v = expected
    assert new_m.codes.shape == m.codes.shape and new_v.scales.shape == (BLOCKS, 1)
    assert bool(jnp.all(jnp.isfinite(new_params)))


@pytest.mark.parametrize("platform,backend", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_kernel_lowers_for_accelerators(platform, backend):
    for state_format in FORMATS:
        g, p, m, v, scalars, m_code, v_code = _inputs(state_format)
        lowered = _call(backend, True, False, m_code, v_code).trace(g, p, m, v, scalars).lower(lowering_platforms=(platform,))
        text = lowered.as_text()
        assert ("__gpu$xla.gpu.triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)


def test_bad_backend_lists_the_options():
    g, p, m, v, scalars, m_code, v_code = _inputs("int8")
    with pytest.raises(ValueError, match="backend: 'cuda' is not available; choose one of 'auto', 'triton', 'mosaic_tpu', 'xla'"):
        fused_adamw(g, p, m, v, scalars, m_code=m_code, v_code=v_code, hyper=HYPER, backend="cuda")
