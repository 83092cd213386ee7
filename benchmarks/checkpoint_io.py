"""Checkpoint I/O: save throughput against a plain write, async blocking, cross-mesh restore.

A state of `--megabytes` of random fp32 arrays (transformer-like shapes, ZeRO-3 style
sharding over `data`) on `--devices` simulated CPU devices (or, with JAX_PLATFORMS=cuda,
that many GPUs: there the fingerprints are device reductions, as in training), saved with the framework's
Checkpointer (Orbax + fingerprints + metadata). Baselines measured in the same run:

- plain write: the same bytes fetched to the host and written with numpy to one file
  per leaf, fsync'd; ratio = plain time / our synchronous save time (target >= 0.7);
- async blocking: how long `save()` holds the caller with async on, against the whole
  synchronous save (target <= 10%);
- restore onto a different mesh (data=2 x tensor=4, other dims sharded) against
  restore onto the mesh it was saved from (target <= 1.5x);
- `checkpoint verify` (every leaf read back and fingerprinted with numpy) against
  reading the plain write's files back with numpy.

Every timing starts after `os.sync()`, one untimed round compiles first, and each
ratio is the median over rounds of that round's own ratio.

    python benchmarks/checkpoint_io.py [--devices 8] [--megabytes 512] [--repeats 7] [--dir /dev/shm]

On a shared virtual disk one write can take three times another of the same bytes;
`--dir /dev/shm` (tmpfs, where fsync is free) measures what is left: the software
cost of each path, the fair comparison of our save against the plain write.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None,
                        help="where to write (default: the system temp dir); /dev/shm leaves out the disk")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda --devices 1: one GPU's arrays

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from efficient_train.checkpoint import Checkpointer, leaf_paths
    from efficient_train.checkpoint.verify import verify_step

    hidden = 1024
    layer_bytes = 12 * hidden * hidden * 4
    layers = max(1, args.megabytes * 2**20 // layer_bytes)
    saved_mesh = jax.make_mesh((args.devices,), ("data",))
    cross_mesh = args.devices >= 2  # one GPU has no other mesh to restore onto
    other_mesh = jax.make_mesh((2, args.devices // 2), ("data", "tensor")) if cross_mesh else None
    shapes = {"qkv": (layers, hidden, 3 * hidden), "o": (layers, hidden, hidden), "mlp_in": (layers, hidden, 4 * hidden),
              "mlp_out": (layers, 4 * hidden, hidden), "norm": (layers, hidden)}
    saved_specs = {k: P(None, "data") for k in shapes}
    other_specs = {k: P(None, "tensor", "data") if len(s) == 3 else P(None, "tensor") for k, s in shapes.items()}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    state = {
        name: jax.device_put(jax.random.normal(key, shape, jnp.float32), NamedSharding(saved_mesh, saved_specs[name]))
        for key, (name, shape) in zip(keys, shapes.items())
    }
    total_bytes = sum(x.nbytes for x in state.values())
    root = tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir)

    def plain_write(keep: bool = False) -> float:
        directory = os.path.join(root, "plain") if keep else tempfile.mkdtemp(dir=root)
        os.makedirs(directory, exist_ok=True)
        os.sync()  # every timing starts with no earlier run's dirty pages in flight
        start = time.perf_counter()
        for path, leaf in leaf_paths(state):
            with open(os.path.join(directory, path.replace("/", "_") + ".npy"), "wb") as f:
                np.save(f, np.asarray(jax.device_get(leaf)))
                f.flush()
                os.fsync(f.fileno())
        elapsed = time.perf_counter() - start
        if not keep:
            shutil.rmtree(directory)
        return elapsed

    def plain_read() -> float:
        start = time.perf_counter()
        for name in sorted(os.listdir(os.path.join(root, "plain"))):
            np.load(os.path.join(root, "plain", name))
        return time.perf_counter() - start

    def verify() -> float:
        start = time.perf_counter()
        problems = verify_step(reader.step_dir(1))
        elapsed = time.perf_counter() - start
        assert not problems, problems
        return elapsed

    def our_save(async_save: bool) -> tuple[float, float]:
        directory = tempfile.mkdtemp(dir=root)
        checkpointer = Checkpointer(directory, keep=1, keep_every=0, async_save=async_save)
        os.sync()
        start = time.perf_counter()
        checkpointer.save(1, state, model={}, mesh={"data": args.devices}, zero_stage=3, optimizer={}, data=None, seed=0)
        blocked = time.perf_counter() - start
        checkpointer.wait()
        whole = time.perf_counter() - start
        checkpointer.close()
        shutil.rmtree(directory)
        return blocked, whole

    def restore(mesh, specs) -> float:
        abstract = {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, specs[name]))
                    for name, shape in shapes.items()}
        start = time.perf_counter()
        restored, _ = reader.restore_step(1, abstract, model={})
        jax.block_until_ready(restored)
        return time.perf_counter() - start

    plain_write(), our_save(False), our_save(True)  # warm-up: compiles the fingerprint programs, faults pages in
    plain, sync_whole, async_blocked, async_whole = [], [], [], []
    for _ in range(args.repeats):
        plain.append(plain_write())
        sync_whole.append(our_save(False)[1])
        blocked, whole = our_save(True)
        async_blocked.append(blocked)
        async_whole.append(whole)
    reader_dir = os.path.join(root, "reader")
    reader = Checkpointer(reader_dir, keep=1, keep_every=0, async_save=False)
    reader.save(1, state, model={}, mesh={"data": args.devices}, zero_stage=3, optimizer={}, data=None, seed=0)
    reader.wait()
    restore(saved_mesh, saved_specs)  # warm-up
    if cross_mesh:
        restore(other_mesh, other_specs)
    plain_write(keep=True)
    plain_read(), verify()  # warm-up
    same, other, reads, verifies = [], [], [], []
    for _ in range(args.repeats):
        same.append(restore(saved_mesh, saved_specs))
        if cross_mesh:
            other.append(restore(other_mesh, other_specs))
        reads.append(plain_read())
        verifies.append(verify())
    shutil.rmtree(root)

    # Ratios are taken within each round (its measurements ran back to back) and then
    # their median: a shared machine's slow spells then hit both sides of a ratio.
    median = statistics.median
    gb = total_bytes / 1e9
    throughput_rounds = [p / s for p, s in zip(plain, sync_whole)]
    async_throughput = median(p / w for p, w in zip(plain, async_whole))
    blocking_rounds = [b / s for b, s in zip(async_blocked, sync_whole)]
    cross_mesh_rounds = [o / s for o, s in zip(other, same)]
    verify_rounds = [v / r for v, r in zip(verifies, reads)]
    throughput, blocking = median(throughput_rounds), median(blocking_rounds)
    print(f"state: {total_bytes / 2**20:.0f} MiB in {len(shapes)} leaves, {args.devices} {jax.devices()[0].platform} devices; "
          f"medians of {args.repeats} rounds")
    print(f"plain numpy write      {median(plain):7.3f} s  {gb / median(plain):6.2f} GB/s")
    print(f"our save (sync)        {median(sync_whole):7.3f} s  {gb / median(sync_whole):6.2f} GB/s  "
          f"throughput ratio ours/plain {throughput:.2f} (target >= 0.7)")
    print(f"our save (async)       blocks {median(async_blocked):7.3f} s of {median(async_whole):.3f} s; "
          f"blocked / sync save {blocking:.3f} (target <= 0.10); "
          f"throughput ratio of the whole async save {async_throughput:.2f}")
    print(f"restore, same mesh     {median(same):7.3f} s")
    if cross_mesh:
        print(f"restore, other mesh    {median(other):7.3f} s  ratio {median(cross_mesh_rounds):.2f} (target <= 1.5)")
    print(f"checkpoint verify      {median(verifies):7.3f} s  {gb / median(verifies):6.2f} GB/s  "
          f"against a numpy read of the plain files {median(verify_rounds):.2f}x ({median(reads):.3f} s)")
    for name, rounds in (("throughput", throughput_rounds), ("blocking", blocking_rounds), ("cross-mesh", cross_mesh_rounds),
                         ("verify", verify_rounds)):
        if rounds:
            print(f"{name:<11} per round: {' '.join(f'{r:.3f}' for r in rounds)}")


if __name__ == "__main__":
    sys.exit(main())
