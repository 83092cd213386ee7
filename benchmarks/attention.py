"""Attention kernel throughput: our Pallas/Triton flash attention vs cuDNN vs PyTorch.

TFLOP/s of forward and forward+backward, causal and not, bf16, head_dim 128, at
sequence lengths 2k..16k (tokens per call held at --tokens, so the batch shrinks as the
sequence grows), for:
- ours:  pallas_kernels.flash_attention(backend='triton');
- cudnn: jax.nn.dot_product_attention(implementation='cudnn');
- torch: torch.nn.functional.scaled_dot_product_attention restricted to its flash
  backend, on the same GPU (skipped if torch is not importable or has no CUDA).
FLOPs: forward 4*B*H*T*S*D (halved when causal), backward 2.5x forward. Timing: jit,
warm-up, block_until_ready (torch: cuda.synchronize), median of --repeats. Before timing,
ours is checked against the plain-JAX reference on the GPU (GQA, segments, offsets, odd
lengths). Also measures a large bf16 matmul as the attainable peak.

    python benchmarks/attention.py                 # on a GPU (about 2 minutes)
    python benchmarks/attention.py --cpu-smoke     # no GPU: tiny sizes, interpreted kernel

Without a GPU and without --cpu-smoke it says 'no GPU' and measures nothing.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_seconds  # noqa: E402

from pallas_kernels import BlockSizes, flash_attention  # noqa: E402


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool,
                    backward: bool) -> float:
    fwd = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)


def jax_impls(interpret: bool) -> dict[str, Callable]:
    """name -> attention(q, k, v, causal) on [B, T, H, D] arrays."""
    impls: dict[str, Callable] = {
        "ours": lambda q, k, v, causal: flash_attention(
            q, k, v, causal=causal, backend="triton", interpret=interpret,
            block_sizes=BlockSizes(16, 16, 16, 16, 16, 16) if interpret else None)}
    if not interpret:
        impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
    return impls


def fwd_and_fwdbwd(attn: Callable, causal: bool) -> tuple[Callable, Callable]:
    fwd = jax.jit(lambda q, k, v: attn(q, k, v, causal))

    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v, causal).astype(jnp.float32) * do)

    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def torch_timer(repeats: int) -> Callable | None:
    """Returns time(batch, seq, heads, head_dim, causal, backward) -> seconds, or None."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None

    def run(batch: int, seq: int, heads: int, head_dim: int, causal: bool,
            backward: bool) -> float:
        shape = (batch, heads, seq, head_dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16,
                               requires_grad=backward) for _ in range(3))
        do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

        def step() -> None:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            if backward:
                out.backward(do)

        times = []
        for rep in range(repeats + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            if rep >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    return run


def matmul_peak(repeats: int) -> float:
    """TFLOP/s of an 8192^3 bf16 matmul (fp32 accumulation): the attainable peak."""
    n = 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / median_seconds(f, (a, a), repeats) / 1e12


def check_on_device(interpret: bool) -> None:
    """ours vs the reference on this device; raises if they disagree."""
    key = jax.random.PRNGKey(0)
    # fp32 on a GPU: Triton, like XLA, multiplies fp32 in TF32 by default.
    for dtype, tol in ((jnp.float32, 1e-4 if interpret else 5e-3), (jnp.bfloat16, 3e-2)):
        b, t, s, h, kvh, d = (2, 45, 50, 4, 2, 64) if interpret else (2, 300, 333, 8, 2, 128)
        kq, kk, kv, kd, ks = jax.random.split(key, 5)
        q = jax.random.normal(kq, (b, t, h, d), dtype)
        k = jax.random.normal(kk, (b, s, kvh, d), dtype)
        v = jax.random.normal(kv, (b, s, kvh, d), dtype)
        do = jax.random.normal(kd, (b, t, h, d), jnp.float32)
        q_seg = jnp.sort(jax.random.randint(ks, (b, t), 0, 3), axis=1)
        kv_seg = jnp.concatenate([jnp.zeros((b, s - t), jnp.int32), q_seg], axis=1)
        kw = dict(causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                  q_offset=s - t + 5, kv_offset=0, return_lse=True)
        blocks = BlockSizes(16, 16, 16, 16, 16, 16) if interpret else None

        def loss(q, k, v, backend):
            pallas = backend != "xla"
            out, lse = flash_attention(q, k, v, **kw, backend=backend,
                                       interpret=interpret and pallas,
                                       block_sizes=blocks if pallas else None)
            finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return jnp.sum(out.astype(jnp.float32) * do) + jnp.sum(finite), (out, lse)

        ours = jax.jit(jax.value_and_grad(lambda *a: loss(*a, "triton"), argnums=(0, 1, 2),
                                          has_aux=True))
        def ref_loss(*a):
            with jax.default_matmul_precision("highest"):
                return loss(*(x.astype(jnp.float32) for x in a), "xla")

        ref = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True))
        ((_, (o1, l1)), g1), ((_, (o2, l2)), g2) = ours(q, k, v), ref(q, k, v)
        errors = {"out": (o1, o2), "lse": (l1, l2), "dq": (g1[0], g2[0]),
                  "dk": (g1[1], g2[1]), "dv": (g1[2], g2[2])}
        report = []
        for name, (x, y) in errors.items():
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            if not np.array_equal(np.isinf(x), np.isinf(y)):
                raise AssertionError(f"{dtype.__name__} {name}: -inf rows differ")
            x, y = np.where(np.isinf(x), 0, x), np.where(np.isinf(y), 0, y)
            rel = float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30))
            report.append(f"{name} {rel:.1e}")
            if not rel < tol:
                raise AssertionError(f"{dtype.__name__} {name}: relative error {rel} >= {tol}")
        print(f"check {dtype.__name__}: ok ({', '.join(report)})", flush=True)


SWEEP_FWD = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 2),
             (64, 64, 4, 3), (128, 128, 4, 3)]
SWEEP_BWD = [(64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 4, 3), (64, 32, 32, 64, 4, 3),
             (128, 64, 64, 128, 8, 2), (64, 64, 128, 64, 8, 2), (32, 64, 64, 32, 4, 2)]


def sweep(seq: int, tokens: int, heads: int, head_dim: int, repeats: int) -> None:
    """TFLOP/s of ours over candidate block sizes (causal, bf16): forward configs as
    (block_q, block_kv, warps, stages), then backward ones as (block_q_dq, block_kv_dq,
    block_q_dkv, block_kv_dkv, warps, stages) timed as forward+backward."""
    batch = max(1, tokens // seq)
    shape = (batch, seq, heads, head_dim)
    key = jax.random.PRNGKey(2)
    q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in jax.random.split(key, 3))
    do = jax.random.normal(key, shape, jnp.float32)
    configs = [BlockSizes(bq, bk, num_warps=w, num_stages=st) for bq, bk, w, st in SWEEP_FWD]
    configs += [BlockSizes(block_q_dq=a, block_kv_dq=b, block_q_dkv=c, block_kv_dkv=d,
                           num_warps_bwd=w, num_stages_bwd=st)
                for a, b, c, d, w, st in SWEEP_BWD]
    for i, blocks in enumerate(configs):
        backward = i >= len(SWEEP_FWD)
        attn = functools.partial(flash_attention, backend="triton", block_sizes=blocks)
        fwd, fwdbwd = fwd_and_fwdbwd(lambda q, k, v, c: attn(q, k, v, causal=c), True)
        fn, fargs = (fwdbwd, (q, k, v, do)) if backward else (fwd, (q, k, v))
        flops = attention_flops(batch, heads, seq, head_dim, True, backward)
        try:
            result = f"{flops / median_seconds(fn, fargs, repeats) / 1e12:7.1f} TFLOP/s"
        except Exception as e:  # a config Triton rejects (e.g. out of shared memory)
            result = f"failed: {type(e).__name__}: {str(e)[:200]}"
        print(f"sweep seq={seq} causal {'fwd+bwd' if backward else 'fwd'} {blocks}: {result}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", default="2048,4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=32768, help="batch * seq per call")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweep", type=int, default=0, metavar="SEQ",
                        help="instead of the table: time ours over candidate block sizes")
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
        seqs, tokens, heads, head_dim, repeats = [64, 128], 256, 2, 64, 1
    else:
        seqs = [int(x) for x in args.seqs.split(",")]
        tokens, heads, head_dim, repeats = args.tokens, args.heads, args.head_dim, args.repeats

    if args.sweep:
        sweep(args.sweep, tokens, heads, head_dim, repeats)
        return
    try:
        check_on_device(interpret)
        failed = False
    except Exception as e:  # still time it, but exit non-zero at the end
        print(f"CHECK FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        failed = True
    peak = None if interpret else matmul_peak(repeats)
    if peak:
        print(f"bf16 matmul peak (measured): {peak:.0f} TFLOP/s", flush=True)
    impls = jax_impls(interpret)
    torch_time = None if interpret else torch_timer(repeats)
    names = list(impls) + (["torch"] if torch_time else [])
    if not torch_time and not interpret:
        print("torch: not importable or no CUDA; skipped")

    header = f"{'seq':>6} {'causal':>6} {'pass':>7} " + " ".join(f"{n:>7}" for n in names)
    header += "  ours/cudnn" if "cudnn" in names else ""
    header += "  ours/peak" if peak else ""
    rows = [header]
    print(header + "   (TFLOP/s)", flush=True)
    key = jax.random.PRNGKey(1)
    for seq in seqs:
        batch = max(1, tokens // seq)
        shape = (batch, seq, heads, head_dim)
        q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16)
                   for kk in jax.random.split(key, 3))
        do = jax.random.normal(key, shape, jnp.float32)
        for causal in (False, True):
            for backward in (False, True):
                flops = attention_flops(batch, heads, seq, head_dim, causal, backward)
                tflops = {}
                for name, attn in impls.items():
                    fwd, fwdbwd = fwd_and_fwdbwd(attn, causal)
                    fn, fargs = (fwdbwd, (q, k, v, do)) if backward else (fwd, (q, k, v))
                    try:
                        tflops[name] = flops / median_seconds(fn, fargs, repeats) / 1e12
                    except Exception as e:  # report and go on: one failure must not hide the rest
                        print(f"{name} seq={seq} causal={causal} failed: "
                              f"{type(e).__name__}: {str(e)[:300]}", flush=True)
                if torch_time:
                    tflops["torch"] = flops / torch_time(batch, seq, heads, head_dim, causal,
                                                         backward) / 1e12
                line = f"{seq:>6} {str(causal):>6} {'fwd+bwd' if backward else 'fwd':>7} "
                line += " ".join(f"{tflops[n]:7.1f}" if n in tflops else f"{'-':>7}"
                                 for n in names)
                if "cudnn" in names:
                    ratio = (tflops["ours"] / tflops["cudnn"]
                             if "ours" in tflops and "cudnn" in tflops else float("nan"))
                    line += f"  {ratio:10.2f}"
                if peak:
                    line += f"  {tflops.get('ours', float('nan')) / peak:9.2f}"
                rows.append(line)
                print(line, flush=True)
    print("\n".join(["", f"summary (TFLOP/s, bf16, head_dim {head_dim}, {heads} heads, "
                         f"{tokens} tokens/call):"] + rows))
    if failed:
        sys.exit("the correctness check failed (see above)")


if __name__ == "__main__":
    main()
