"""RMSNorm throughput: the fused Pallas/Triton kernel against XLA's fusion of the reference.

For rows in --rows x hidden in --hiddens (bf16 x and y, fp32 scale, as in the model),
times the forward and the forward+backward (y, dx and dscale from one jitted vjp) of:
- pallas: pallas_kernels.rms_norm(backend='triton');
- xla:    jax.jit of the plain reference (backend='xla'), which XLA fuses itself.
RMSNorm is memory-bound, so the figure is achieved bandwidth: the bytes an ideal
implementation must move divided by the time. Forward: read x, write y (2 x rows x
hidden x 2 bytes); forward+backward adds read x and dy, write dx (5 x rows x hidden x 2
bytes in all); scale, dscale and the kernel's inv_rms residual are counted in neither.
The ratio pallas/xla is of those bandwidths, so > 1 means the kernel is faster. Timing:
jit, warm-up, block_until_ready, median of --repeats. Before timing, the kernel is
checked against the reference on the device (forward and both gradients, bf16 and fp32,
odd row counts and a hidden that is not a power of two).

    python benchmarks/rms_norm.py                  # on a GPU (under a minute)
    python benchmarks/rms_norm.py --block-rows 4   # the kernel with another block size
    python benchmarks/rms_norm.py --cpu-smoke      # no GPU: tiny sizes, interpreted kernel

Without a GPU and without --cpu-smoke it says 'no GPU' and measures nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_seconds  # noqa: E402

from pallas_kernels import rms_norm  # noqa: E402

EPS = 1e-5


def norms(interpret: bool, block_rows: int | None) -> dict[str, Callable]:
    """name -> norm(x, scale), y in x's dtype."""
    return {
        "pallas": lambda x, s: rms_norm(x, s, eps=EPS, backend="triton", interpret=interpret,
                                        block_rows=block_rows),
        "xla": lambda x, s: rms_norm(x, s, eps=EPS, backend="xla"),
    }


def fwd_and_fwdbwd(norm: Callable) -> tuple[Callable, Callable]:
    def fwdbwd(x, scale, dy):
        y, vjp = jax.vjp(norm, x, scale)
        return y, *vjp(dy)

    return jax.jit(norm), jax.jit(fwdbwd)


def check_on_device(interpret: bool, block_rows: int | None) -> None:
    """The kernel vs the reference (in fp32 on the same inputs) on this device; raises
    if they disagree."""
    impls = norms(interpret, block_rows)
    for dtype, tol, shape in ((jnp.float32, 1e-4, (3, 333, 96)),
                              (jnp.bfloat16, 2e-2, (2, 1001, 4096))):
        if interpret:
            shape = (3, 7, shape[-1])
        kx, ks, kd = jax.random.split(jax.random.PRNGKey(0), 3)
        x = (jax.random.normal(kx, shape) + 0.3).astype(dtype)
        scale = jax.random.normal(ks, shape[-1:], jnp.float32)
        dy = jax.random.normal(kd, shape, dtype)
        ours = fwd_and_fwdbwd(impls["pallas"])[1](x, scale, dy)
        ref = fwd_and_fwdbwd(impls["xla"])[1](x.astype(jnp.float32), scale,
                                              dy.astype(jnp.float32))
        report = []
        for name, got, want in zip(("y", "dx", "dscale"), ours, ref):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            diff = float(np.max(np.abs(got - want)))
            rel = diff / (float(np.max(np.abs(want))) + 1e-30)
            report.append(f"{name} max abs diff {diff:.1e} (relative {rel:.1e})")
            if not rel < tol:
                raise AssertionError(f"{dtype.__name__} {name}: relative error {rel} >= {tol}")
        print(f"check {dtype.__name__} {shape}: ok ({', '.join(report)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="8192,32768")
    parser.add_argument("--hiddens", default="2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block-rows", type=int, default=None,
                        help="the kernel's rows per program (default: its own choice)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="without a GPU: tiny sizes, kernel in the Pallas interpreter")
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    if not on_gpu and not args.cpu_smoke:
        print("no GPU: nothing measured (pass --cpu-smoke for a tiny interpreted run)")
        return
    interpret = not on_gpu
    if interpret:
        print("no GPU: --cpu-smoke, tiny sizes, kernel interpreted; numbers mean nothing")
        rows_list, hiddens, repeats = [64], [128, 256], 1
    else:
        rows_list = [int(r) for r in args.rows.split(",")]
        hiddens = [int(h) for h in args.hiddens.split(",")]
        repeats = args.repeats

    try:
        check_on_device(interpret, args.block_rows)
        failed = False
    except Exception as e:  # still time it, but exit non-zero at the end
        print(f"CHECK FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        failed = True

    impls = norms(interpret, args.block_rows)
    header = (f"{'rows':>6} {'hidden':>6} {'pass':>7} {'pallas ms':>9} {'xla ms':>8} "
              f"{'pallas GB/s':>11} {'xla GB/s':>8} {'pallas/xla':>10}")
    lines = [header]
    print(header, flush=True)
    key = jax.random.PRNGKey(1)
    for rows in rows_list:
        for hidden in hiddens:
            kx, ks, kd = jax.random.split(key, 3)
            x = jax.random.normal(kx, (rows, hidden), jnp.bfloat16)
            scale = jax.random.normal(ks, (hidden,), jnp.float32)
            dy = jax.random.normal(kd, (rows, hidden), jnp.bfloat16)
            for backward in (False, True):
                nbytes = (5 if backward else 2) * rows * hidden * x.dtype.itemsize
                seconds = {}
                for name, norm in impls.items():
                    fwd, fwdbwd = fwd_and_fwdbwd(norm)
                    fn, fargs = (fwdbwd, (x, scale, dy)) if backward else (fwd, (x, scale))
                    try:
                        seconds[name] = median_seconds(fn, fargs, repeats)
                    except Exception as e:  # report and go on: one failure must not hide the rest
                        print(f"{name} rows={rows} hidden={hidden} failed: "
                              f"{type(e).__name__}: {str(e)[:300]}", flush=True)
                nan = float("nan")
                ms = {n: seconds.get(n, nan) * 1e3 for n in impls}
                gbs = {n: nbytes / seconds[n] / 1e9 if n in seconds else nan for n in impls}
                line = (f"{rows:>6} {hidden:>6} {'fwd+bwd' if backward else 'fwd':>7} "
                        f"{ms['pallas']:9.3f} {ms['xla']:8.3f} {gbs['pallas']:11.0f} "
                        f"{gbs['xla']:8.0f} {gbs['pallas'] / gbs['xla']:10.2f}")
                lines.append(line)
                print(line, flush=True)
    print("\n".join(["", "summary (bf16 x/y/dy/dx, fp32 scale; GB/s = ideal bytes / time):"]
                    + lines))
    if failed:
        sys.exit("the correctness check failed (see above)")


if __name__ == "__main__":
    main()
