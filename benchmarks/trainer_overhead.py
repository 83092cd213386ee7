"""Trainer overhead: our compiled step against a minimal hand-written jax.jit + optax step.

Same model, weights, batch, mesh and optimizer (clip + AdamW with the same schedule);
the baseline is what a JAX user writes in twenty lines (auto-partitioned data
parallelism, no skip-on-non-finite, no metrics). Each is timed as the median of many
steps, the two interleaved in rounds so machine noise hits both alike.

    python benchmarks/trainer_overhead.py [--devices N] [--config FILE] [--steps 30]
        [--config.FIELD=VALUE ...]

Prints both medians and the ratio ours / baseline (target <= 1.03).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=None, help="simulate N CPU devices")
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round, each side")
    parser.add_argument("--rounds", type=int, default=3)
    args, extra = parser.parse_known_args()
    if args.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import optax

    from efficient_train import Trainer, get_config
    from efficient_train.cli import _split_overrides
    from efficient_train.config import apply_overrides
    from efficient_train.optim import decay_mask
    from efficient_train.train.loss import next_token_loss
    from efficient_train.train.state import bind

    config = get_config(args.config)
    apply_overrides(config, _split_overrides(extra))
    config.zero_stage = 0
    config.train.steps = 10**6
    config.workdir = "/tmp/efficient_train_overhead"
    trainer = Trainer(config)
    setup, step_def = trainer.setup, trainer.setup.step_def
    train = config.train

    baseline_opt = optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(step_def.schedule, b1=config.optimizer.b1, b2=config.optimizer.b2, eps=config.optimizer.eps,
                    weight_decay=config.optimizer.weight_decay, mask=decay_mask(step_def.param_structure)),
    )

    def baseline_step(params, opt_state, batch):
        def loss(p):
            total, weight = next_token_loss(bind(step_def.graphdef, step_def.param_structure, p), batch)
            return total / weight

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = baseline_opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = jax.tree.map(jnp.copy, trainer.state.params)
    opt_state = baseline_opt.init(params)
    batch = trainer._to_device(trainer._next_batch())
    jitted = jax.jit(baseline_step, donate_argnums=(0, 1))

    def time_ours() -> float:
        start = time.perf_counter()
        trainer.state, metrics = trainer.compiled(trainer.state, batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    def time_baseline() -> float:
        nonlocal params, opt_state
        start = time.perf_counter()
        params, opt_state, value = jitted(params, opt_state, batch)
        jax.block_until_ready(value)
        return time.perf_counter() - start

    for _ in range(3):  # warm up both (compile, first-touch allocations)
        time_ours(), time_baseline()
    ours, base = [], []
    for _ in range(args.rounds):
        ours += [time_ours() for _ in range(args.steps)]
        base += [time_baseline() for _ in range(args.steps)]
    ours_median, base_median = statistics.median(ours), statistics.median(base)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, mesh {dict(trainer.mesh.shape)}, "
          f"{setup.num_params / 1e6:.2f}M params, batch {train.batch_size} x {config.data.seq_len}")
    print(f"ours     median step {ours_median * 1e3:9.3f} ms over {len(ours)} steps")
    print(f"baseline median step {base_median * 1e3:9.3f} ms over {len(base)} steps")
    print(f"ratio ours/baseline: {ours_median / base_median:.3f} (target <= 1.03)")


if __name__ == "__main__":
    sys.exit(main())
