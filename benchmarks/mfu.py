"""Training throughput and MFU of a config on the devices at hand (meant for a GPU).

Runs the Trainer's compiled step on one fixed batch (so the data pipeline is not
measured), times `--steps` steps after warm-up with the device synchronized each step,
and reports the median step time, tokens/s, model TFLOP/s per device and MFU (model
FLOPs per token from the model config, against the device's dense bf16 peak), and the
custom calls in the compiled step (so a backend choice is seen to take effect).

    python benchmarks/mfu.py --config configs/llama_1b.py --config.train.batch_size=8 [--steps 20]

On a CPU MFU is reported as null (no peak in the table).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args, extra = parser.parse_known_args()

    import jax

    from efficient_train import Trainer, get_config
    from efficient_train.cli import _split_overrides
    from efficient_train.config import apply_overrides
    from efficient_train.train.metrics import peak_tflops, throughput

    config = get_config(args.config)
    config.data.source = "synthetic"
    config.workdir = "/tmp/efficient_train_mfu"
    apply_overrides(config, _split_overrides(extra))
    config.train.steps = 10**6
    trainer = Trainer(config)
    startup = trainer.startup_record()
    batch = trainer._to_device(trainer._next_batch())

    def timed_step() -> float:
        start = time.perf_counter()
        trainer.state, metrics = trainer.compiled(trainer.state, batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed_step()
    times = [timed_step() for _ in range(args.steps)]
    step_time = statistics.median(times)
    result = throughput(
        tokens_per_step=trainer.tokens_per_step,
        step_time_s=step_time,
        flops_per_token=trainer.setup.flops_per_token(config.data.seq_len),
        num_devices=jax.device_count(),
        peak=peak_tflops(jax.devices()[0]),
    )
    report = {
        "device": f"{jax.devices()[0].device_kind} x {jax.device_count()}",
        "params": startup["num_params"],
        "batch": [config.train.batch_size, config.data.seq_len],
        "zero_stage": config.zero_stage,
        "remat": config.model.remat,
        "attention": config.attention.impl,
        "norm": config.norm.impl,
        "matmul_precision": config.model.matmul_precision,
        "loss_chunk": config.train.loss_chunk,
        # Which kernels the compiled step really calls (cuDNN fused attention, Triton from Pallas, ...):
        "custom_calls": dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', trainer.compiled.as_text()))),
        "per_device_gib": {k: round(v / 2**30, 3) for k, v in startup["per_device_bytes"].items()},
        "step_time_s_min_median_max": [min(times), step_time, max(times)],
        **result,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
