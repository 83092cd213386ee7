"""FP8 against bf16 GEMMs at a model's projection shapes: forward + backward time, error, kernels.

For each projection of a Llama layer (q, k/v, o, gate/up, down) at `--tokens` tokens and
`--hidden`/`--intermediate` widths (default: llama_8b), times forward + backward of
`models.fp8.matmul` against the bf16 product `Linear` computes, reports the ratio, the
relative error of the FP8 product against the bf16 one, and the custom calls in the
compiled FP8 program (on H100/H200: `__cublas$lt$matmul$f8`, proof the FP8 GEMM ran).

    python benchmarks/fp8_matmul.py                     # llama_8b widths, 8192 tokens
    python benchmarks/fp8_matmul.py --tokens 256 --hidden 256 --intermediate 512 --kv 64   # CPU smoke
"""
from __future__ import annotations

import argparse
import collections
import json
import re


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--kv", type=int, default=1024, help="num_kv_heads x head_dim")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from timing import median_seconds

    from efficient_train.models import fp8

    e, m, kv = args.hidden, args.intermediate, args.kv
    shapes = {"q_or_o": (e, e), "k_or_v": (e, kv), "gate_or_up": (e, m), "down": (m, e)}

    def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.dot_general(x, w.astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.bfloat16)

    def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
        return fp8.matmul(x, w, 1, jnp.bfloat16)

    def program(matmul):
        def loss(x: jax.Array, w: jax.Array) -> jax.Array:
            return jnp.sum(matmul(x, w).astype(jnp.float32))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def timed(fn, *inputs) -> float:
        return median_seconds(fn, inputs, args.steps, warmup=1)

    total = {"bf16": 0.0, "fp8": 0.0}
    for name, (k, n) in shapes.items():
        x = jax.random.normal(jax.random.key(0), (args.tokens, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * k ** -0.5
        bf16_fn = program(bf16_matmul).lower(x, w).compile()
        fp8_fn = program(fp8_matmul).lower(x, w).compile()
        t_bf16, t_fp8 = timed(bf16_fn, x, w), timed(fp8_fn, x, w)
        total["bf16"] += t_bf16
        total["fp8"] += t_fp8
        reference = bf16_matmul(x, w).astype(jnp.float32)
        error = float(jnp.linalg.norm(fp8_matmul(x, w).astype(jnp.float32) - reference) / jnp.linalg.norm(reference))
        calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', fp8_fn.as_text()))
        flops = 6 * args.tokens * k * n  # forward + both backward GEMMs
        print(json.dumps({
            "device": jax.devices()[0].device_kind, "gemm": name, "m_k_n": [args.tokens, k, n],
            "ms_bf16": round(1e3 * t_bf16, 3), "ms_fp8": round(1e3 * t_fp8, 3), "speedup": round(t_bf16 / t_fp8, 3),
            "tflops_bf16": round(flops / t_bf16 / 1e12, 1), "tflops_fp8": round(flops / t_fp8 / 1e12, 1),
            "relative_error_vs_bf16": round(error, 4), "fp8_custom_calls": dict(calls),
        }), flush=True)
    print(json.dumps({"layer_gemms_speedup": round(total["bf16"] / total["fp8"], 3)}))


if __name__ == "__main__":
    main()
