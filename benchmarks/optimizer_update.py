"""Optimizer update throughput: compressed AdamW (XLA path and fused Pallas kernel) against
optax.adamw with fp32 states, in the same run, on the same parameter tree.

    python benchmarks/optimizer_update.py                      # 1B parameters (an accelerator)
    python benchmarks/optimizer_update.py --params 16e6        # a CPU-sized tree
    python benchmarks/optimizer_update.py --formats int8,fp8 --kernels xla,pallas --steps 20 --rounds 3

The tree is square fp32 matrices (4096 x 4096 by default) adding up to --params. One step
is `optim.apply_updates` (new params and state, donated) for ours and `update` +
`optax.apply_updates` for optax, each jitted. Each variant is timed as the median of
--steps steps per round, the variants interleaved over --rounds rounds so machine noise
hits all alike. Printed per variant: ms per step, parameters per second, optimizer-state
bytes per parameter, the speedup over optax fp32, and the ideal speedup from memory
traffic alone (read g, p and the state, write p and the state: 28 bytes per parameter
for fp32, about 16 for int8). Before timing, where both kernels run, it prints how far
the Pallas kernel's first step is from the XLA path's on this device (bit-equality is
promised on CPU in interpret mode only: GPU compilers fuse multiply-adds differently).
On CPU the kernel would run interpreted, so the default kernel there is 'xla' only.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=1e9, help="parameters in the tree (rounded to whole matrices)")
    parser.add_argument("--side", type=int, default=4096, help="matrices are side x side")
    parser.add_argument("--formats", default="int8,fp8,int4,bf16")
    parser.add_argument("--kernels", default=None, help="comma list of xla,pallas (default: both on GPU/TPU, xla on CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    from efficient_train import optim

    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    kernels = (args.kernels or ("xla,pallas" if on_accelerator else "xla")).split(",")
    count = max(1, round(args.params / args.side**2))
    shape = (args.side, args.side)
    keys = jax.random.split(jax.random.key(0), 2 * count)
    make = jax.jit(lambda k, s: s * jax.random.normal(k, shape, jnp.float32))
    grads = {f"w{i}": make(keys[i], 1.0) for i in range(count)}
    num_params = count * args.side**2
    print(f"optimizer update: {num_params / 1e9:.3f}B parameters ({count} x {shape}), {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}", flush=True)

    variants = {"optax.adamw fp32": optax.adamw(1e-3, weight_decay=0.1)}
    for state_format in args.formats.split(","):
        for kernel in kernels:
            if state_format == "bf16" and kernel == "pallas":
                continue  # bf16 states are plain XLA elementwise code; no kernel
            variants[f"{state_format} {kernel}"] = optim.adamw(1e-3, weight_decay=0.1, state_format=state_format, kernel=kernel)

    def runner(name: str, optimizer):
        def step(g, s, p):
            if name.startswith("optax"):
                u, s = optimizer.update(g, s, p)
                return optax.apply_updates(p, u), s
            return optim.apply_updates(optimizer, g, s, p)

        return jax.jit(step, donate_argnums=(1, 2))

    state = {}
    for name, optimizer in variants.items():
        try:
            params = {f"w{j}": make(keys[count + j], 0.02) for j in range(count)}
            opt_state = optimizer.init(params)
            state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
            step = runner(name, optimizer)
            params, opt_state = step(grads, opt_state, params)  # compile and warm up
            jax.block_until_ready(params)
        except Exception as error:  # noqa: BLE001 -- one variant failing (a kernel that does not compile) must not hide the rest
            print(f"{name}: FAILED: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
            continue
        state[name] = [step, params, opt_state, state_bytes / num_params, []]

    # After the identical first step: does the kernel agree with the XLA path on this device?
    for state_format in args.formats.split(","):
        pair = [state.get(f"{state_format} {kernel}") for kernel in ("xla", "pallas")]
        if None in pair:
            continue
        (_, p_xla, s_xla, *_), (_, p_kernel, s_kernel, *_) = pair
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_kernel)))
        codes = [(a, b) for a, b in zip(jax.tree.leaves(s_xla), jax.tree.leaves(s_kernel)) if a.dtype == jnp.uint8]
        agree = sum(int(jnp.sum(a == b)) for a, b in codes) / sum(a.size for a, _ in codes)
        print(f"{state_format}: pallas vs xla after one step: max |param difference| {diff:.3g}, codes equal {100 * agree:.4f}%")

    for _ in range(args.rounds):
        for entry in state.values():
            step, params, opt_state = entry[:3]
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                params, opt_state = step(grads, opt_state, params)
                jax.block_until_ready(params)
                times.append(time.perf_counter() - start)
            entry[1], entry[2] = params, opt_state
            entry[4].append(statistics.median(times))

    base = statistics.median(state["optax.adamw fp32"][4])
    base_traffic = 4 + 8 + 2 * state["optax.adamw fp32"][3]
    print(f"{'variant':<18} {'ms/step':>9} {'Gparam/s':>9} {'state B/param':>14} {'speedup':>8} {'traffic bound':>14}")
    for name, entry in state.items():
        t = statistics.median(entry[4])
        traffic = 4 + 8 + 2 * entry[3]
        print(f"{name:<18} {t * 1e3:9.2f} {num_params / t / 1e9:9.2f} {entry[3]:14.3f} {base / t:8.3f} {base_traffic / traffic:14.3f}")
    speedups = ", ".join(f"{name} {base / statistics.median(entry[4]):.2f}x" for name, entry in state.items() if not name.startswith("optax"))
    print(f"speedup over optax.adamw fp32 ({base * 1e3:.2f} ms/step): {speedups}")


if __name__ == "__main__":
    main()
