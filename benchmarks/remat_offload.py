"""Remat policies against each other (meant for a GPU): activation offload vs recompute.

For each `--policies` entry, tries the `--batches` in increasing order, each in a process
of its own (a clean peak-memory counter, and an out-of-memory failure ends only that
try), and stops the policy at the first batch that does not fit. Per try: the median
step time of the Trainer's compiled step on one fixed batch, tokens/s, the device's
peak bytes in use, the compiled step's memory analysis (device temp, host temp), how
many buffers the compiled program places in host memory (`S(5)` in its layouts: the
offloaded activations), and the first losses (same seed and batch, so policies must
agree). The summary gives each policy's largest batch that fits, and each offload
policy against the recompute policies at the largest batch both fit.

    python benchmarks/remat_offload.py --config configs/llama_1b.py --batches 8,16,24 \
        --policies full,save_dots,offload_dots,save_attention,offload_attention --config.zero_stage=0
    python benchmarks/remat_offload.py --batches 2,4 --steps 2 --warmup 1    # CPU smoke run (tiny)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def measure_one(config_path: str | None, overrides: list[str], policy: str, batch: int, steps: int,
                warmup: int) -> dict:
    import jax

    from efficient_train import Trainer, get_config
    from efficient_train.cli import _split_overrides
    from efficient_train.config import apply_overrides

    config = get_config(config_path)
    config.data.source = "synthetic"
    config.workdir = tempfile.mkdtemp(prefix="efficient_train_remat_")
    apply_overrides(config, _split_overrides(overrides))
    config.model.remat = policy
    config.train.batch_size = batch
    config.train.steps = 10**6
    trainer = Trainer(config)
    analysis = trainer.compiled.memory_analysis()
    batch_arrays = trainer._to_device(trainer._next_batch())
    losses = []

    def timed_step() -> float:
        start = time.perf_counter()
        trainer.state, metrics = trainer.compiled(trainer.state, batch_arrays)
        jax.block_until_ready(metrics)
        losses.append(float(metrics["loss"]))
        return time.perf_counter() - start

    for _ in range(warmup):
        timed_step()
    times = [timed_step() for _ in range(steps)]
    step_time = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "policy": policy,
        "batch": batch,
        "seq_len": config.data.seq_len,
        "device": jax.devices()[0].device_kind,
        "step_time_s": step_time,
        "tokens_per_s": batch * config.data.seq_len / step_time,
        "peak_gib": round(stats["peak_bytes_in_use"] / 2**30, 3) if "peak_bytes_in_use" in stats else None,
        "temp_gib": round(analysis.temp_size_in_bytes / 2**30, 3),
        "host_temp_gib": round(getattr(analysis, "host_temp_size_in_bytes", 0) / 2**30, 3),
        "host_buffers": trainer.compiled.as_text().count("S(5)"),
        "first_losses": losses[:3],
    }


def try_in_subprocess(args: argparse.Namespace, extra: list[str], policy: str, batch: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--one", policy, str(batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--config", args.config] if args.config else []), *extra]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.try_timeout)
    except subprocess.TimeoutExpired:
        return {"policy": policy, "batch": batch, "error": "failed", "stderr_tail": [f"timeout {args.try_timeout} s"]}
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    reason = "out of memory" if any(m in out.stderr for m in OUT_OF_MEMORY) else "failed"
    return {"policy": policy, "batch": batch, "error": reason, "stderr_tail": out.stderr.strip().splitlines()[-3:]}


def summary(results: list[dict]) -> dict:
    fits = [r for r in results if "error" not in r]
    largest = {}
    for r in fits:
        if r["batch"] >= largest.get(r["policy"], {"batch": 0})["batch"]:
            largest[r["policy"]] = r
    versus = []
    for offload in (p for p in largest if p.startswith("offload_")):
        for other in (p for p in largest if not p.startswith("offload_")):
            common = max((r["batch"] for r in fits if r["policy"] == offload
                          and any(o["policy"] == other and o["batch"] == r["batch"] for o in fits)), default=None)
            if common is None:
                continue
            a = next(r for r in fits if r["policy"] == offload and r["batch"] == common)
            b = next(r for r in fits if r["policy"] == other and r["batch"] == common)
            versus.append({"offload": offload, "against": other, "batch": common,
                           "step_time_ratio": round(a["step_time_s"] / b["step_time_s"], 3),
                           "peak_gib": [a["peak_gib"], b["peak_gib"]], "temp_gib": [a["temp_gib"], b["temp_gib"]],
                           "losses_equal": a["first_losses"] == b["first_losses"]})
    return {"largest_batch": {p: {k: r[k] for k in ("batch", "step_time_s", "tokens_per_s", "peak_gib", "temp_gib",
                                                     "host_temp_gib", "host_buffers")} for p, r in largest.items()},
            "offload_vs": versus}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--policies", default="full,save_dots,offload_dots,save_attention,offload_attention")
    parser.add_argument("--batches", default="8,16,24", help="batch sizes to try, increasing")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--try_timeout", type=int, default=600, help="seconds for one (policy, batch) try")
    parser.add_argument("--one", nargs=2, metavar=("POLICY", "BATCH"), help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.one:
        print(json.dumps(measure_one(args.config, extra, args.one[0], int(args.one[1]), args.steps, args.warmup)))
        return 0
    results = []
    for policy in args.policies.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            result = try_in_subprocess(args, extra, policy, batch)
            print(json.dumps(result), flush=True)
            results.append(result)
            if "error" in result:
                break
    print(json.dumps({"summary": summary(results)}))
    failed = [r for r in results if r.get("error") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
