"""Evaluation's cost against a train step, and KV-cache decoding against decoding without a cache,
on the default (tiny) model, same run.

Evaluation: the trainer of the default config (byte-level text, 16 x 128 tokens per
batch) with one evaluation set; the time of one evaluation batch (`Evaluator.run` over
`--eval_steps` batches, divided) against one train step (`--steps` steps, each waited
for), both after compiling, interleaved over `--rounds` rounds.

Decoding: `generate` of `--new_tokens` tokens for a batch of prompts (greedy), tokens/s
after compiling, against the baseline of decoding without a cache: one compiled full
forward pass over the whole (fixed-length) sequence per new token, argmax at the last
position, which is what a cache saves.

    python benchmarks/watch_overhead.py [--devices 1] [--steps 10] [--eval_steps 10] [--rounds 3]
        [--batch 8] [--prompt_len 32] [--new_tokens 128]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sysconfig
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from efficient_train import Trainer, get_config
    from efficient_train.generate import SamplingOptions, generate
    from efficient_train.train.state import bind

    config = get_config()
    config.workdir = tempfile.mkdtemp(prefix="watch_overhead_")
    config.tracker.tensorboard = False
    held_out = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
    config.eval.update(sets=f"held_out=text:{held_out}", steps=args.eval_steps)
    trainer = Trainer(config)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, {trainer.setup.num_params:,} parameters, "
          f"batch {config.train.batch_size} x {config.data.seq_len} tokens")
    trainer.evaluator.run(trainer.state.params, 0)  # warm: host batches, first dispatch
    jax.block_until_ready(trainer.step())

    train_ms, eval_ms = [], []
    for round_index in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            jax.block_until_ready(trainer.step()["loss"])
        train_ms.append((time.perf_counter() - start) / args.steps * 1e3)
        record = trainer.evaluator.run(trainer.state.params, int(trainer.state.step))
        batches = trainer.evaluator.sets[0].num_batches(args.eval_steps)
        eval_ms.append(record["eval_time_s"] / batches * 1e3)
        print(f"round {round_index}: train step {train_ms[-1]:.1f} ms, eval batch {eval_ms[-1]:.1f} ms, "
              f"ratio {eval_ms[-1] / train_ms[-1]:.3f}")
    ratios = [e / t for e, t in zip(eval_ms, train_ms)]
    print(f"eval batch / train step: median {statistics.median(ratios):.3f} (an evaluation of {args.eval_steps} "
          f"batches costs {statistics.median(ratios) * args.eval_steps:.2f} train steps)")

    step_def = trainer.setup.step_def
    model = bind(step_def.graphdef, step_def.param_structure, trainer.state.params, step_def.rest)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(32, 127, size=args.prompt_len).tolist() for _ in range(args.batch)]
    greedy = SamplingOptions(temperature=0)
    generate(model, prompts, max_new_tokens=args.new_tokens, options=greedy)  # compile
    total = args.prompt_len + args.new_tokens

    @jax.jit
    def no_cache_next(model, tokens, positions, segments, last):
        logits = model(tokens, positions, segments)
        return jnp.argmax(logits[jnp.arange(tokens.shape[0]), last], axis=-1).astype(jnp.int32)

    def uncached(prompts: list[list[int]]) -> list[list[int]]:
        tokens = np.zeros((len(prompts), total), np.int32)
        tokens[:, : args.prompt_len] = prompts
        positions = np.broadcast_to(np.arange(total, dtype=np.int32), tokens.shape).copy()
        out = []
        for i in range(args.new_tokens):
            length = args.prompt_len + i
            segments = (positions < length).astype(np.int32)
            chosen = np.asarray(no_cache_next(model, tokens, positions, segments, np.full(len(prompts), length - 1)))
            tokens[:, length] = chosen
            out.append(chosen)
        return np.stack(out, axis=1).tolist()

    uncached(prompts)  # compile
    cached_s, uncached_s = [], []
    for round_index in range(args.rounds):
        start = time.perf_counter()
        with_cache = generate(model, prompts, max_new_tokens=args.new_tokens, options=greedy)
        cached_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        without = uncached(prompts)
        uncached_s.append(time.perf_counter() - start)
        assert with_cache == without, "KV-cache decoding and full forward passes chose different tokens"
        tokens = args.batch * args.new_tokens
        print(f"round {round_index}: KV cache {tokens / cached_s[-1]:,.0f} tok/s, no cache "
              f"{tokens / uncached_s[-1]:,.0f} tok/s, speedup {uncached_s[-1] / cached_s[-1]:.2f}")
    tokens = args.batch * args.new_tokens
    print(f"decode (batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens): KV cache median "
          f"{tokens / statistics.median(cached_s):,.0f} tok/s, speedup over no cache "
          f"{statistics.median(u / c for u, c in zip(uncached_s, cached_s)):.2f}x")


if __name__ == "__main__":
    main()
