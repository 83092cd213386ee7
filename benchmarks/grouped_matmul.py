"""The MoE grouped matmul alone: our Pallas/Triton kernel at several tile sizes against ragged_dot.

TFLOP/s of the forward and of forward+backward (rows' and weights' gradients) of
out[r] = rows[r] @ w[group(r)], bf16, at Qwen3-30B-A3B's expert widths by default (K 2048,
N 768, 128 groups, 65536 rows = 8192 tokens x 8 experts each), group sizes drawn from a
skewed (Zipf-like) distribution so tiles straddle unequal groups. FLOPs: 2 x rows x K x N
forward, 3x that with the backward. Before timing, the kernel is checked against
jax.lax.ragged_dot on a small case on the same device. ragged_dot itself is timed only
where --ragged-groups allows (XLA expands it densely over the groups: G times the FLOPs
and memory), as the same sizes with that many groups.

    python benchmarks/grouped_matmul.py                   # on a GPU (about a minute)
    python benchmarks/grouped_matmul.py --cpu-smoke       # no GPU: tiny sizes, interpreted kernel

Tiles: --tiles "block_m,block_k,block_n,warps,stages;..." (powers of two; the kernel fits
block_k and block_n to divisors of K and N).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_seconds  # noqa: E402

from pallas_kernels.grouped_matmul import GroupedBlocks, grouped_matmul  # noqa: E402

DEFAULT_TILES = "64,64,64,4,2;128,64,128,8,3;128,128,128,8,3;64,128,64,4,3"


def group_sizes(rows: int, groups: int, seed: int = 0) -> np.ndarray:
    """`groups` sizes summing to `rows`, skewed: weights 1 / (rank + 1) in a random order."""
    rng = np.random.default_rng(seed)
    weights = rng.permutation(1.0 / np.arange(1, groups + 1))
    sizes = np.floor(weights / weights.sum() * rows).astype(np.int32)
    sizes[np.argmax(sizes)] += rows - sizes.sum()
    return sizes


def passes(matmul: Callable) -> dict[str, Callable]:
    """The forward, and the forward with both gradients, of one grouped matmul implementation."""
    forward = jax.jit(matmul)

    @jax.jit
    def with_grads(x, w, sizes):
        out, vjp = jax.vjp(lambda a, b: matmul(a, b, sizes), x, w)
        return vjp(out)

    return {"fwd": forward, "fwd+bwd": with_grads}


def check(interpret: bool, dtype: jnp.dtype) -> float:
    """Largest |kernel - ragged_dot| / max |ragged_dot| over the value and both gradients, on a small
    skewed case (bf16 outputs: one rounding step is 2**-8 of the magnitude)."""
    sizes = jnp.asarray(group_sizes(1000, 8, seed=1))
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (1000, 256), dtype)
    w = (jax.random.normal(key_w, (8, 256, 128), jnp.float32) / 16).astype(dtype)
    ours = passes(lambda a, b, s: grouped_matmul(a, b, s, backend="triton", interpret=interpret))
    ref = passes(jax.lax.ragged_dot)
    worst = 0.0
    for name in ours:
        for a, b in zip(jax.tree.leaves(ours[name](x, w, sizes)), jax.tree.leaves(ref[name](x, w, sizes))):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            worst = max(worst, float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=768)
    parser.add_argument("--groups", type=int, default=128)
    parser.add_argument("--ragged-groups", type=int, default=8, help="groups for the ragged_dot baseline (0: skip)")
    parser.add_argument("--tiles", default=DEFAULT_TILES)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.cpu_smoke:
        print("no GPU: pass --cpu-smoke to check the plumbing with tiny sizes")
        return
    if args.cpu_smoke:
        args.rows, args.k, args.n, args.groups, args.repeats = 256, 64, 32, 8, 1
        args.ragged_groups, args.tiles = min(args.ragged_groups, 4), "32,32,32,4,2"
    interpret = not on_gpu
    dtype = jnp.bfloat16
    print(json.dumps({"device": str(jax.devices()[0].device_kind), "check_max_relative_diff": check(interpret, dtype)}))
    key_x, key_w = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (args.rows, args.k), dtype)
    flops = 2.0 * args.rows * args.k * args.n
    cases: list[tuple[str, Callable, int]] = []
    for spec in args.tiles.split(";"):
        bm, bk, bn, warps, stages = map(int, spec.split(","))
        blocks = GroupedBlocks(block_m=bm, block_k=bk, block_n=bn, num_warps=warps, num_stages=stages)
        matmul = (lambda blocks: lambda a, b, s: grouped_matmul(a, b, s, backend="triton", interpret=interpret,
                                                               blocks=blocks))(blocks)
        cases.append((f"pallas {spec}", matmul, args.groups))
    if args.ragged_groups:
        cases.append(("ragged_dot", jax.lax.ragged_dot, args.ragged_groups))
        cases.append((f"pallas {args.tiles.split(';')[0]} at ragged_dot's groups", cases[0][1], args.ragged_groups))
    for name, matmul, groups in cases:
        sizes = jnp.asarray(group_sizes(args.rows, groups))
        w = (jax.random.normal(key_w, (groups, args.k, args.n), jnp.float32) / args.k ** 0.5).astype(dtype)
        row = {"impl": name, "groups": groups, "rows": args.rows, "k": args.k, "n": args.n}
        for pass_name, fn in passes(matmul).items():
            try:
                seconds = median_seconds(fn, (x, w, sizes), args.repeats)
            except Exception as error:  # noqa: BLE001 - an out-of-memory baseline is a result, not a crash
                row[pass_name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
                continue
            scale = 3.0 if pass_name == "fwd+bwd" else 1.0
            row[pass_name + "_ms"] = round(seconds * 1e3, 3)
            row[pass_name + "_tflops"] = round(scale * flops / seconds / 1e12, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
