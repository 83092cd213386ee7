"""Sequence parallelism on the simulated 8-device CPU mesh: reach, traffic, step time.

    python benchmarks/sequence_parallel.py [--parts memory,comm,time] [--budget-mib 512]
        [--impls xla,pallas] [--seq-len 2048] [--steps 5]

memory  Longest sequence whose train step fits a per-device budget (args + outputs +
        temp from the compiled step's memory_analysis, nothing allocated), one sequence
        per device at S=1 (data=8) against one sequence over S=8 devices, per mode and
        local attention kernel. Searched by doubling, then bisection to 1/16.
comm    Bytes each device receives per layer (attention forward + backward) read from the
        compiled HLO (collectives inside while loops counted x their known trip count),
        against each mode's formula.
time    Median train-step time of each mode at S=8 against S=1 on the same tokens per
        device (CPU: compute-bound, the collectives are memory copies).

Model: 2 layers, hidden 128, 8 heads of 16 (2 kv heads), vocab 256, fp32. The CPU
compiler's temp bytes are an estimate for GPU/TPU (other fusion and scheduling).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

S = 8
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 16
MODES = ("all_gather", "ulysses", "ring")
_ITEMSIZE = {"f64": 8, "s64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "collective-permute", "all-reduce")


def _config(mode: str, size: int, seq_len: int, impl: str, batch_per_group: int = 1) -> Any:
    from efficient_train import get_config

    c = get_config()
    c.model.update(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=HEADS,
                   num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    c.data.update(source="synthetic", seq_len=seq_len)
    c.attention.impl = impl
    c.sequence_parallel.mode = mode
    c.mesh.update(data=8 // size, sequence=size)
    c.train.update(batch_size=(8 // size) * batch_per_group, steps=10**6)
    c.workdir = tempfile.mkdtemp(prefix="efficient_train_sp_bench_")
    return c


# --- memory ---------------------------------------------------------------------------

def _total_bytes(mode: str, size: int, seq_len: int, impl: str) -> int:
    from efficient_train.train.estimate import estimate_memory

    return estimate_memory(_config(mode, size, seq_len, impl))["per_device_bytes"]["total"]


def longest_fitting(fits: Callable[[int], bool], start: int = 512, step: int = 256) -> int:
    """Largest multiple of `step` that fits (0 if `step` does not): doubling, then bisection to 1/16."""
    if not fits(step):
        return 0
    lo = step
    hi = max(start, step)
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(step, lo // 16):
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory(budget: int, impls: list[str]) -> None:
    print(f"\n## longest sequence within {budget / 2**20:.0f} MiB per device (S=1: data=8; S=8: sequence=8)")
    print("| local kernel | S=1 | " + " | ".join(f"S=8 {m}" for m in MODES) + " |")
    print("|---|---|" + "---|" * len(MODES))
    for impl in impls:
        fits = lambda mode, size, impl=impl: lambda t: _total_bytes(mode, size, t, impl) <= budget
        base = longest_fitting(fits("all_gather", 1))
        cells = []
        for mode in MODES:
            reach = longest_fitting(fits(mode, S), start=max(512, base))
            cells.append(f"{reach} ({reach / base:.1f}x)" if base else str(reach))
        print(f"| {impl} | {base} | " + " | ".join(cells) + " |", flush=True)


# --- communication --------------------------------------------------------------------

def _computations(hlo: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if header and line.rstrip().endswith("{"):
            name = "ENTRY" if line.startswith("ENTRY") else header.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def _multipliers(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per program execution (while bodies x trip count)."""
    calls: dict[str, list[tuple[str, int]]] = {name: [] for name in comps}
    for name, lines in comps.items():
        for line in lines:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            body = re.search(r"body=%([\w.\-]+)", line)
            if body:
                calls[name].append((body.group(1), int(trips.group(1)) if trips else 1))
            for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
                calls[name].append((callee, 1))
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
                calls[name].extend((b.strip().lstrip("%"), 1) for b in branches.split(","))
    counts = {name: 0 for name in comps}

    def visit(name: str, times: int) -> None:
        counts[name] += times
        for callee, n in calls.get(name, []):
            if callee in comps:
                visit(callee, times * n)

    visit("ENTRY", 1)
    return counts


def received_bytes(hlo: str, size: int) -> dict[str, int]:
    """Bytes each device receives, per collective kind, for one run of the program."""
    comps = _computations(hlo)
    times = _multipliers(comps)
    total = {op: 0 for op in _COLLECTIVES}
    for name, lines in comps.items():
        for line in lines:
            for op in _COLLECTIVES:
                where = max(line.find(f" {op}("), line.find(f" {op}-start("))
                if where < 0 or "=" not in line[:where]:
                    continue
                result = line[line.index("=") + 1: where]
                nbytes = sum(_ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d)
                             for t, dims in re.findall(r"\b(\w+)\[([0-9,]*)\]", result) if t in _ITEMSIZE)
                share = {"all-gather": (size - 1) / size, "all-to-all": (size - 1) / size,
                         "reduce-scatter": size - 1, "collective-permute": 1,
                         "all-reduce": 2 * (size - 1) / size}[op]
                total[op] += int(nbytes * share) * times[name]
    return total


def formula_bytes(mode: str, size: int, batch: int, seq_len: int, itemsize: int = 4) -> int:
    """Bytes each device receives per layer, attention forward + backward (ids are int32)."""
    local = batch * seq_len // size
    kv = local * KV_HEADS * HEAD_DIM * itemsize  # one of K, V on one device
    ids = local * 4
    if mode == "all_gather":  # gather K, V, segment ids, positions; reduce-scatter dK, dV
        return (size - 1) * (2 * kv + 2 * ids) + (size - 1) * 2 * kv
    if mode == "ulysses":  # all-to-all q, k, v (kv heads repeated up to S), out; the same back
        kv_heads = max(KV_HEADS, size)
        per_pass = (2 * HEADS + 2 * kv_heads) * local * HEAD_DIM * itemsize * (size - 1) // size
        return 2 * per_pass + (size - 1) * 2 * ids
    # ring: S-1 hops of (K, V, segment ids) forward and backward, S hops of fp32 dK, dV
    return 2 * (size - 1) * (2 * kv + ids) + size * 2 * local * KV_HEADS * HEAD_DIM * 4


def comm(seq_len: int, batch: int = 1) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from efficient_train.models.attention import attention
    from efficient_train.parallel import sequence as sequence_parallel

    print(f"\n## bytes received per device per layer (attention fwd+bwd), S={S}, batch {batch} x {seq_len}, "
          f"{HEADS} heads / {KV_HEADS} kv heads of {HEAD_DIM}, fp32")
    print("| mode | from HLO | formula | HLO / formula | collectives (HLO) |")
    print("|---|---|---|---|---|")
    mesh = Mesh(np.array(jax.devices()[:S]), ("sequence",))
    q = jax.ShapeDtypeStruct((batch, seq_len, HEADS, HEAD_DIM), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, seq_len, KV_HEADS, HEAD_DIM), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    for mode in MODES:
        def local(q, k, v, seg, pos, mode=mode):
            with sequence_parallel.sharding("sequence", mode):
                return attention(q, k, v, segment_ids=seg, positions=pos, impl="xla")

        sharded = jax.shard_map(local, mesh=mesh, in_specs=P(None, "sequence"), out_specs=P(None, "sequence"),
                                check_vma=False)
        loss = lambda q, k, v, seg, pos, sharded=sharded: jnp.sum(sharded(q, k, v, seg, pos) ** 2)
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile().as_text()
        measured = received_bytes(hlo, S)
        expected = formula_bytes(mode, S, batch, seq_len)
        found = ", ".join(f"{op} {n / 2**20:.2f} MiB" for op, n in measured.items() if n)
        got = sum(measured.values())
        print(f"| {mode} | {got / 2**20:.2f} MiB | {expected / 2**20:.2f} MiB | {got / expected:.3f} | {found} |",
              flush=True)


# --- step time ------------------------------------------------------------------------

def step_time(seq_len: int, steps: int) -> None:
    import jax

    from efficient_train import Trainer

    print(f"\n## train step time, CPU mesh of 8, {seq_len // S} tokens of one {seq_len}-token sequence per "
          f"device at S=8 (8 sequences, data=1) against one whole sequence per device at S=1 (data=8)")
    print("| layout | median step | vs S=1 |")
    print("|---|---|---|")
    base = None
    for name, mode, size in [("S=1", "all_gather", 1)] + [(f"S=8 {m}", m, S) for m in MODES]:
        trainer = Trainer(_config(mode, size, seq_len, "xla", batch_per_group=S if size == S else 1))
        jax.block_until_ready(trainer.step())
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(trainer.step())
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        base = base or median
        print(f"| {name} | {median * 1e3:.0f} ms | {median / base:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="memory,comm,time")
    parser.add_argument("--budget-mib", type=int, default=512)
    parser.add_argument("--impls", default="xla,pallas", help="local attention kernels for the memory part")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length of the comm and time parts")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={S}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    parts = args.parts.split(",")
    if "memory" in parts:
        memory(args.budget_mib * 2**20, args.impls.split(","))
    if "comm" in parts:
        comm(args.seq_len)
    if "time" in parts:
        step_time(args.seq_len, args.steps)


if __name__ == "__main__":
    main()
