"""The vocabulary-chunked loss against the whole-logits loss: temp bytes and step time.

For each vocabulary size, compiles loss + gradients (w.r.t. hidden states and head) of
`train.loss.cross_entropy` on [tokens, hidden] states, once whole (chunk 0) and once in
chunks, and prints the compiled temp bytes (`memory_analysis`) and the median time of
`--steps` runs, with the chunked/whole ratios. Where the ratio of time stays near 1 and
the memory saved matters is where `train.loss_chunk=-1` (auto) turns chunking on.

    python benchmarks/chunked_loss.py --tokens 4096 --hidden 256 --vocabs 2048,8192,32768 --chunk 8192
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocabs", default="2048,8192,32768,65536")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from timing import median_seconds

    from efficient_train.models.llama.model import OutputHead
    from efficient_train.train.loss import cross_entropy

    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (args.tokens, args.hidden), dtype)

    def measure(w: jax.Array, targets: jax.Array, chunk: int) -> tuple[int, float]:
        def loss(h: jax.Array, w: jax.Array) -> jax.Array:
            return cross_entropy(h, OutputHead(w, True, dtype, 0.0), targets, chunk=chunk).sum()

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes, median_seconds(compiled, (h, w), args.steps, warmup=1)

    for vocab in (int(v) for v in args.vocabs.split(",")):
        w = jax.random.normal(keys[1], (vocab, args.hidden), jnp.float32) * args.hidden ** -0.5
        targets = jax.random.randint(keys[2], (args.tokens,), 0, vocab)
        full_temp, full_time = measure(w, targets, 0)
        chunk_temp, chunk_time = measure(w, targets, args.chunk)
        print(json.dumps({
            "device": jax.devices()[0].device_kind, "tokens": args.tokens, "hidden": args.hidden, "vocab": vocab,
            "chunk": args.chunk, "dtype": args.dtype,
            "temp_mib_full": round(full_temp / 2**20, 1), "temp_mib_chunked": round(chunk_temp / 2**20, 1),
            "time_ms_full": round(1e3 * full_time, 2), "time_ms_chunked": round(1e3 * chunk_time, 2),
            "temp_ratio": round(chunk_temp / max(full_temp, 1), 3), "time_ratio": round(chunk_time / full_time, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
