"""MoE step cost against a dense model of equal active parameters, and all-to-all bytes against the formula.

On 8 simulated CPU devices (or the GPUs there are), the same small Llama with
- dense: an MLP of intermediate k x E_i (the active size of the MoE's routed experts),
- moe dropless: X experts of E_i, k per token, grouped matmul (jax.lax.ragged_dot),
- moe capacity: the same experts through a [X, C, H] buffer (capacity_factor 1.25),
each on the same mesh (data x expert; the dense model treats `expert` as a batch axis).
Step time: median of --steps trainer steps after two warm-up steps; printed as a ratio
to the dense step. The MoE also pays its router and its exchange: that is the point.

All-to-all bytes: read from the compiled step's HLO (every all-to-all in the scanned
layer body runs once per layer: count the ops, multiply by their result bytes) and
compared with the formula per device, per MoE layer and micro-batch, forward and backward:
- dropless: 4 x G x R x H x b (dispatch and return, and their transposes) + G x R x 4
  (the expert ids, forward only), R = local tokens x min(k, X / G) rows per peer, G = mesh.expert;
- capacity: 4 x X x C x H x b, C = ceil(factor x local tokens x k / X).
The bytes that leave a device are (G - 1) / G of these.

    python benchmarks/moe.py                 # CPU, 8 simulated devices, about 3 minutes on 2 cores
    python benchmarks/moe.py --steps 20 --hidden 256
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from efficient_train import Trainer, get_config  # noqa: E402
from efficient_train.data import Batch  # noqa: E402

_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32)\[([0-9,]*)\]")
_ITEMSIZE = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2}


def all_to_all_bytes(hlo: str) -> int:
    """Sum of the result bytes (a tuple's parts included) of every all-to-all op in the HLO text, each
    counted once."""
    total = 0
    for line in hlo.splitlines():
        where = line.find(" all-to-all(")
        if where < 0 or "=" not in line[:where]:
            continue
        for dtype, dims in _SHAPE.findall(line[line.index("=") + 1: where]):
            total += math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[dtype]
    return total


def config(args: argparse.Namespace, mode: str) -> object:
    c = get_config()
    c.model.update(hidden_size=args.hidden, num_heads=4, num_kv_heads=2, head_dim=args.hidden // 4,
                   num_layers=args.layers, intermediate_size=args.experts_per_token * args.expert_size)
    if mode != "dense":
        c.model.update(num_experts=args.experts, experts_per_token=args.experts_per_token,
                       moe_intermediate_size=args.expert_size, capacity_factor=1.25 if mode == "capacity" else 0.0)
    c.mesh.update(data=args.data, expert=args.expert)
    c.data.update(source="synthetic", seq_len=args.seq_len)
    c.train.update(batch_size=args.batch, steps=10_000, log_every=10_000)
    c.checkpoint.every = 0
    c.workdir = tempfile.mkdtemp(prefix="bench_moe_")
    return c


def batch(args: argparse.Namespace) -> Batch:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (args.batch, args.seq_len + 1), dtype=np.int32)
    shape = (args.batch, args.seq_len)
    return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                 positions=np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape).copy(),
                 segment_ids=np.ones(shape, np.int32), loss_weights=np.ones(shape, np.float32))


def measure(args: argparse.Namespace, mode: str) -> tuple[float, int]:
    one = batch(args)
    trainer = Trainer(config(args, mode), data=iter([one] * (args.steps + 3)))
    for _ in range(2):
        jax.block_until_ready(trainer.step()["loss"])
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(trainer.step()["loss"])
        times.append(time.perf_counter() - start)
    return statistics.median(times), all_to_all_bytes(trainer.compiled.as_text())


def formula(args: argparse.Namespace, mode: str) -> int:
    if args.expert == 1:
        return 0  # no expert axis: nothing is exchanged
    tokens = args.batch * args.seq_len // (args.data * args.expert)
    g, h, b = args.expert, args.hidden, 4  # fp32 activations (the tiny recipe)
    if mode == "capacity":
        c = math.ceil(1.25 * tokens * args.experts_per_token / args.experts)
        return 4 * args.experts * c * h * b
    rows = tokens * min(args.experts_per_token, args.experts // g)  # per peer: parallel/experts.peer_rows
    return 4 * g * rows * h * b + g * rows * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--experts_per_token", type=int, default=2)
    parser.add_argument("--expert_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--expert", type=int, default=4)
    args = parser.parse_args()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh data={args.data} x expert={args.expert}; "
          f"hidden {args.hidden}, {args.layers} layers, {args.experts} experts of {args.expert_size}, "
          f"top {args.experts_per_token}; batch {args.batch} x {args.seq_len}")
    dense, _ = measure(args, "dense")
    print(f"dense (intermediate {args.experts_per_token * args.expert_size}): {dense * 1e3:8.1f} ms/step  1.00")
    for mode in ("dropless", "capacity"):
        seconds, hlo_bytes = measure(args, mode)
        expected = formula(args, mode)
        print(f"moe {mode:<9}: {seconds * 1e3:8.1f} ms/step  {seconds / dense:.2f} x dense; all-to-all per layer "
              f"(HLO) {hlo_bytes:,} B vs formula {expected:,} B ({hlo_bytes / max(expected, 1):.3f}); per step "
              f"{hlo_bytes * args.layers:,} B")


if __name__ == "__main__":
    main()
