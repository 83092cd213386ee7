"""`efficient_train.optim.optimizer` as an optax transformation: fp32 is optax, compressed
formats track fp32 AdamW closely, respect Adam's update bound, convert both ways, and
report bad input in one line.

Accuracy is measured on gradients built to be hard for block quantization: rows whose
scales spread over orders of magnitude, rows that are nearly dead (1e-6 of the rest),
and 0.2% outliers 100x larger than their neighbours.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficient_train import optim
from efficient_train.config import ConfigError, default_config, validate

B1, B2 = 0.9, 0.999
ADAM_BOUND = 7.27  # sup |m_hat / sqrt(v_hat)| = (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) for b1=0.9, b2=0.999


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 1024)) * 0.02, jnp.float32),
        "stack": jnp.asarray(rng.normal(size=(2, 32, 512)) * 0.02, jnp.float32),
        "scale": jnp.ones((512,), jnp.float32),  # a norm: never compressed
        "odd": jnp.asarray(rng.normal(size=(96, 100)) * 0.02, jnp.float32),  # no block divides 100
    }


def _gradients(params: dict, steps: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    row_scale = {k: np.exp(1.5 * rng.normal(size=p.shape[:-1] + (1,))) for k, p in params.items()}
    for scale in row_scale.values():
        scale.reshape(-1)[:3] = 1e-6  # near-dead rows
    out = []
    for _ in range(steps):
        grads = {}
        for k, p in params.items():
            g = rng.normal(size=p.shape) * row_scale[k]
            g[rng.random(p.shape) < 0.002] *= 100.0
            grads[k] = jnp.asarray(g, jnp.float32)
        out.append(grads)
    return out


def _bitwise_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _run(optimizer, params, grads, fused: bool = False):
    state = optimizer.init(params)

    def step(g, s, p):
        if fused:
            return optim.apply_updates(optimizer, g, s, p)
        u, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step)
    for g in grads:
        params, state = step(g, state, params)
    return params, state


SCHEDULE = optax.linear_schedule(1e-3, 1e-4, 10)
MASK = {"w": True, "stack": True, "scale": False, "odd": True}


def test_fp32_is_optax_adamw_bit_for_bit():
    params, grads = _params(), _gradients(_params(), 4)
    ours = optim.adamw(SCHEDULE, B1, B2, 1e-8, 0.1, mask=MASK)
    theirs = optax.adamw(SCHEDULE, B1, B2, 1e-8, weight_decay=0.1, mask=MASK)
    assert _bitwise_equal(_run(ours, params, grads), _run(theirs, params, grads))
    assert _bitwise_equal(_run(ours, params, grads, fused=True)[0], _run(theirs, params, grads)[0])


@pytest.mark.parametrize("state_format", ["bf16", "int8", "fp8", "int4"])
def test_uncompressed_leaves_run_optax_arithmetic(state_format):
    """With every leaf below min_quantized_size, each format is optax.adamw exactly."""
    params, grads = _params(), _gradients(_params(), 3)
    ours = optim.adamw(SCHEDULE, B1, B2, 1e-8, 0.1, mask=MASK, state_format=state_format, min_quantized_size=10**9)
    theirs = optax.adamw(SCHEDULE, B1, B2, 1e-8, weight_decay=0.1, mask=MASK)
    (p_ours, s_ours), (p_theirs, s_theirs) = _run(ours, params, grads), _run(theirs, params, grads)
    assert _bitwise_equal(p_ours, p_theirs)
    assert _bitwise_equal((s_ours.mu, s_ours.nu), (s_theirs[0].mu, s_theirs[0].nu))


def test_layout_and_usable_in_an_optax_chain():
    params, grads = _params(), _gradients(_params(), 2)
    chained = optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(1e-3, state_format="int8", weight_decay=0.1))
    new_params, state = _run(chained, params, grads)
    adam = state[1]
    assert isinstance(adam, optim.CompressedAdamState) and int(adam.count) == 2
    assert isinstance(adam.mu["w"], optim.Quantized) and adam.mu["w"].block == 256
    assert isinstance(adam.nu["stack"], optim.Quantized) and adam.nu["stack"].scales.shape == (2, 32, 2)
    assert adam.mu["scale"].dtype == jnp.float32 and adam.mu["odd"].dtype == jnp.float32
    bf16 = optim.adamw(1e-3, state_format="bf16").init(params)
    assert bf16.mu["w"].dtype == jnp.bfloat16 and bf16.nu["scale"].dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))


def _mean_update_error(state_format: str, steps: int = 40) -> float:
    """Mean |u - u_fp32| / mean |u_fp32| over compressed leaves, the compressed state
    re-synced from the fp32 one before every step (the error of one step's storage)."""
    params = {"w": _params()["w"], "stack": _params()["stack"]}
    grads = _gradients(params, steps)
    reference = optax.adamw(1.0, B1, B2, 1e-8)
    compressed = optim.adamw(1.0, B1, B2, 1e-8, state_format=state_format)

    @jax.jit
    def both(g, fp32_state):
        u_ref, fp32_state = reference.update(g, fp32_state, params)
        return u_ref, fp32_state

    @jax.jit
    def resynced(g, fp32_state):
        state = optim.from_fp32(optim.to_fp32(fp32_state), compressed, params)
        return compressed.update(g, state, params)[0]

    fp32_state = reference.init(params)
    errors = []
    for i, g in enumerate(grads):
        u = resynced(g, fp32_state)
        u_ref, fp32_state = both(g, fp32_state)
        if i:  # step 1 starts from zero moments, which every format stores exactly
            diff = sum(float(jnp.sum(jnp.abs(u[k] - u_ref[k]))) for k in u)
            errors.append(diff / sum(float(jnp.sum(jnp.abs(u_ref[k]))) for k in u))
    return float(np.mean(errors))


# (floor, limit) of the mean one-step error. Measured with gradient seeds 1-5 (the test runs
# seed 1): bf16 0.140% on every seed, int8 2.597-2.604%, fp8 2.004-2.012%, int4 (experimental,
# dominated by the blocks an outlier shares) 67.38-67.79%. Each limit sits just above the
# worst; each floor is far below it but above what the next finer format gives (bf16's
# rounding for bf16), so a format that silently stopped compressing fails too.
ONE_STEP_ERROR = {"bf16": (1e-4, 0.0016), "int8": (0.005, 0.028), "fp8": (0.005, 0.022), "int4": (0.1, 0.70)}


@pytest.mark.parametrize("state_format", sorted(ONE_STEP_ERROR))
def test_one_step_update_error_against_fp32(state_format):
    floor, limit = ONE_STEP_ERROR[state_format]
    assert floor < _mean_update_error(state_format) <= limit


@functools.cache
def _largest_update(state_format: str) -> float:
    """The largest |element| of the normalized update m_hat / (sqrt(v_hat) + eps) over 300 steps."""
    params = {"w": _params()["w"]}
    grads = _gradients(params, 300, seed=2)
    optimizer = optim.adamw(1.0, B1, B2, 1e-8, state_format=state_format)  # update = -m_hat / (sqrt(v_hat) + eps)

    @jax.jit
    def step(g, state):
        u, state = optimizer.update(g, state, params)
        return jnp.max(jnp.abs(u["w"])), state

    state = optimizer.init(params)
    worst = 0.0
    for g in grads:
        biggest, state = step(g, state)
        worst = max(worst, float(biggest))
    return worst


@pytest.mark.parametrize("state_format", ["int8", "fp8"])
def test_adam_bound_holds_over_hundreds_of_steps(state_format):
    """Adam's bound holds, and the largest update stays where fp32's is: measured over
    gradient seeds 2-6 (the test runs seed 2), fp32 2.034-2.109, int8 2.041-2.147, fp8
    2.019-2.110; the compressed formats at most 0.038 above fp32 on the same gradients. A
    state that rounds v down (updates larger but still bounded) fails the second check."""
    worst = _largest_update(state_format)
    assert np.isfinite(worst) and worst <= ADAM_BOUND
    assert worst <= _largest_update("fp32") + 0.05


def test_int4_largest_update_is_recorded():
    """Experimental int4 does NOT keep Adam's bound: its 4-bit sqrt(v) rounds down by up
    to a third in the coarsest octaves. Measured over gradient seeds 2-6: 6.48 (seed 2,
    run here), 7.53 (seed 3: above the bound), 5.81, 5.96, 5.99. Asserted just above the
    worst, to catch it growing."""
    worst = _largest_update("int4")
    assert np.isfinite(worst) and worst <= 7.6


def test_nonfinite_gradient_poisons_only_its_block():
    """No skipping in the transformation (as optax.adamw): the NaN element's update is NaN
    at once, its block's scales become NaN, so from the next step every element of that
    block (and no other) updates to NaN."""
    params = {"w": _params()["w"]}
    optimizer = optim.adamw(1e-3, state_format="int8")
    g, g2 = _gradients(params, 2)
    bad = {"w": g["w"].at[5, 300].set(jnp.nan)}  # block 1 of row 5
    update = jax.jit(optimizer.update)
    state = optimizer.init(params)
    u_bad, s_bad = update(bad, state, params)
    _, s_ok = update(g, state, params)
    nan_now = np.isnan(np.asarray(u_bad["w"]))
    assert nan_now[5, 300] and nan_now.sum() == 1
    for moment in (s_bad.mu["w"], s_bad.nu["w"]):
        nan_scales = np.isnan(np.asarray(moment.scales))
        assert nan_scales[5, 1] and nan_scales.sum() == 1
    u_next, _ = update(g2, s_bad, params)
    u_next_ok, _ = update(g2, s_ok, params)
    nan_next = np.isnan(np.asarray(u_next["w"]))
    assert nan_next[5, 256:512].all() and nan_next.sum() == 256
    np.testing.assert_array_equal(np.asarray(u_next["w"])[~nan_next], np.asarray(u_next_ok["w"])[~nan_next])


def test_bad_input_gives_one_clear_error():
    with pytest.raises(ValueError, match=r"state_format: 'int3' is not available; choose one of 'fp32', 'bf16', 'int8', 'fp8', 'int4'"):
        optim.adamw(1e-3, state_format="int3")
    with pytest.raises(ValueError, match=r"block_size: 100 is not a power of two from 32 to 4096; choose one of 32, 64, 128, 256, 512"):
        optim.adamw(1e-3, state_format="int8", block_size=100)
    with pytest.raises(ValueError, match=r"kernel: 'cuda' is not available; choose one of 'auto', 'xla', 'pallas'"):
        optim.adamw(1e-3, state_format="int8", kernel="cuda")
    for field, value, message in (
        ("state_format", "int3", r"optimizer.state_format: 'int3' is not allowed; choose one of 'fp32', 'bf16', 'int8'"),
        ("block_size", 96, r"optimizer.block_size: 96 is not allowed; choose one of 32, 64, 128, 256"),
        ("kernel", "cuda", r"optimizer.kernel: 'cuda' is not allowed; choose one of 'auto', 'xla', 'pallas'"),
    ):
        config = default_config()
        config.optimizer[field] = value
        with pytest.raises(ConfigError, match=message):
            validate(config, 8, check_paths=False)


def test_conversion_between_fp32_and_compressed_states():
    params, grads = _params(), _gradients(_params(), 3)
    fp32 = optax.adamw(SCHEDULE, B1, B2, 1e-8, weight_decay=0.1, mask=MASK)
    _, fp32_state = _run(fp32, params, grads)
    moments = optim.to_fp32(fp32_state)
    int8 = optim.adamw(SCHEDULE, B1, B2, 1e-8, 0.1, mask=MASK, state_format="int8")
    state = optim.from_fp32(moments, int8, params)
    assert int(state.count) == 3
    back = optim.to_fp32(state)
    for k in ("w", "stack"):  # quantized: within the format's rounding
        np.testing.assert_allclose(back.mu[k], moments.mu[k], rtol=0.07, atol=0.03 * float(jnp.max(jnp.abs(moments.mu[k]))))
        np.testing.assert_allclose(back.nu[k], moments.nu[k], rtol=0.07, atol=0.03 * float(jnp.max(moments.nu[k])))
    for k in ("scale", "odd"):  # kept in fp32: exact
        np.testing.assert_array_equal(back.mu[k], moments.mu[k])
    # A compressed state back into optax's fp32 layout (with the schedule's step counter).
    restored = optim.from_fp32(back, fp32, params)
    assert int(restored[0].count) == 3 and int(restored[-1].count) == 3
    assert _bitwise_equal(restored[0].mu, back.mu)
    # Training continues from the converted state.
    new_params, _ = jax.jit(lambda g, s, p: optim.apply_updates(int8, g, s, p))(grads[0], state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))
    description = json.loads(json.dumps(optim.describe_state(state)))
    assert description["quantized"]["w"] == {"m": "tapered8s", "v": "tapered8u_nz", "block": 256}
    assert set(description["quantized"]) == {"w", "stack"} and description["format_version"] == 1
