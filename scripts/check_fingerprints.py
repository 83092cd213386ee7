"""Check that the devices' fingerprints equal the host's, on this machine's devices.

A checkpoint's fingerprints are computed by device programs on GPUs and TPUs
(`start_fingerprints(where="device")`) and recomputed with numpy from the saved bytes by
`verify` and by restore. If the two ever disagreed on some dtype or layout, every
restore of such a leaf would look damaged. The test suite checks this on CPU devices
only; this script checks it on the devices jax finds here (scripts/bench_gpu.sh runs it
on the GPU first).

For every dtype a checkpoint holds (float32, bfloat16, float16, the float8 types, int8,
uint8, int16, uint16, int32, uint32), arrays of random bits (NaN patterns included) are
placed on the devices in several layouts: a scalar, odd lengths, replicated, sharded
over one or both axes of a mesh of all devices in either order, on one device, empty,
in host memory where the platform has it, and one large enough to be summed in pieces.
Each array's fingerprint is taken with `where="device"` and `where="host"` in one batch
each, as a save takes them, and with `host_fingerprint` over the whole array as `verify`
does; all three must agree.

    python scripts/check_fingerprints.py [--large-elements N] [--cpu-devices N]

Prints one line per disagreeing array (dtype, shape, layout, the three fingerprints) and
exits 1 if there is any; 0 and a summary line otherwise. Works with jax 0.10 and 0.11.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8", "int16", "uint16",
               "int32", "uint32")


def _layouts(data: int, tensor: int, large_elements: int) -> list[tuple[tuple[int, ...], tuple]]:
    """(shape, PartitionSpec entries) pairs; "" stands for one device, "host" for host memory."""
    devices = data * tensor
    large_rows = devices * max(1, -(-large_elements // (4099 * devices)))
    return [
        ((), ()),
        ((7,), ()),
        ((3001,), ()),
        ((devices * 5, 2051), (("data", "tensor"),)),  # an odd last axis
        ((data * 3, tensor * 7), ("data", "tensor")),
        ((tensor * 4, data * 6), ("tensor", "data")),
        ((3, 5, tensor * 8), (None, None, "tensor")),
        ((2, data * 9, 5, 40), (None, "data")),
        ((0, 4), ()),
        ((9, 33), ""),
        ((devices * 2, 17), "host"),
        ((large_rows, 4099), ("data",)),  # summed in pieces on the device
    ]


def check(large_elements: int | None = None, seed: int = 0) -> tuple[list[str], int]:
    """(a line per array whose fingerprints disagree, the number of arrays checked)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from efficient_train.checkpoint import fingerprint

    devices = jax.devices()
    tensor = 2 if len(devices) % 2 == 0 else 1
    data = len(devices) // tensor
    axis_type = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((data, tensor), ("data", "tensor"), axis_types=(axis_type, axis_type))
    large = fingerprint._PIECE_WORDS + 1 if large_elements is None else large_elements
    host_memory = NamedSharding(mesh, PartitionSpec("data"), memory_kind="pinned_host")
    try:
        jax.device_put(np.zeros((data * 2,), np.float32), host_memory).block_until_ready()
    except (ValueError, RuntimeError, NotImplementedError):  # this platform has no pinned host memory
        host_memory = None
    rng = np.random.default_rng(seed)
    names, arrays, host_copies = [], [], []
    for dtype_name in DTYPE_NAMES:
        dtype = np.dtype(getattr(jax.numpy, dtype_name))
        for shape, spec in _layouts(data, tensor, large):
            words = rng.integers(0, 2 ** (8 * dtype.itemsize), size=shape, dtype=np.uint64)
            host = words.astype(f"u{dtype.itemsize}").view(dtype)
            if spec == "":
                sharding, where = SingleDeviceSharding(devices[-1]), f"on {devices[-1]}"
            elif spec == "host":
                if host_memory is None:
                    continue
                sharding, where = host_memory, "P('data') in pinned_host"
            else:
                sharding, where = NamedSharding(mesh, PartitionSpec(*spec)), f"P{tuple(spec)}"
            names.append(f"{dtype_name}{list(shape)} {where}")
            arrays.append(jax.device_put(host, sharding))
            host_copies.append(host)
    on_device = fingerprint.start_fingerprints(arrays, where="device")()
    on_host = fingerprint.start_fingerprints(arrays, where="host")()
    problems = []
    for name, host, device_print, host_print in zip(names, host_copies, on_device, on_host):
        saved = fingerprint.host_fingerprint(host) if host.size else "0" * 16  # what verify recomputes
        if not device_print == host_print == saved:
            problems.append(f"{name}: device {device_print}, host {host_print}, saved bytes {saved}")
    return problems, len(arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-elements", type=int, default=None,
                        help="elements of the large array of each dtype (default: just past one piece)")
    parser.add_argument("--cpu-devices", type=int, default=None, help="run on this many simulated CPU devices")
    args = parser.parse_args(argv)
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
    import jax

    problems, checked = check(args.large_elements)
    devices = jax.devices()
    where = f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    for problem in problems:
        print(f"MISMATCH {problem}")
    if problems:
        print(f"device fingerprints differ from host fingerprints for {len(problems)} of {checked} arrays on {where}")
        return 1
    print(f"device fingerprints equal host fingerprints for all {checked} arrays "
          f"({len(DTYPE_NAMES)} dtypes) on {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
