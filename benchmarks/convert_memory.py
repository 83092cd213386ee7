"""Peak host memory of `checkpoint convert` against the largest tensor and the whole state.

Writes a Llama-shaped source checkpoint (fp32 params and fp32 AdamW moments, random
values, leaf by leaf) once, then runs each conversion in a fresh process and reads that
process's peak resident memory (VmHWM, reset just before the conversion starts, so
imports and program building are not counted). Reported per conversion:
peak growth, its ratio to the largest tensor, and to the total state bytes.

    python benchmarks/convert_memory.py [--hidden 1024 --layers 12 --vocab 32000]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSIONS = {
    "relayout data=2,tensor=2 (same format)": {"mesh": "data=2,tensor=2"},
    "fp32 -> int8 states on data=4": {"mesh": "data=4", "state_format": "int8"},
    "params only, bf16": {"mesh": "data=4", "drop_optimizer": True, "dtype": "bfloat16"},
}


def _config(args: argparse.Namespace):
    from efficient_train import get_config

    config = get_config()
    config.model.update(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                        num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 256,
                        head_dim=64, tie_embeddings=False, scan_layers=False)
    config.optimizer.state_format = "fp32"
    config.mesh.data = 1
    return config


def write_source(args: argparse.Namespace, directory: str) -> dict:
    """A random fp32 state for `_config(args)`, written leaf by leaf; returns its sizes."""
    import jax
    import numpy as np

    from efficient_train.checkpoint import leaf_paths
    from efficient_train.checkpoint.writer import write_checkpoint
    from efficient_train.parallel.mesh import make_mesh
    from efficient_train.train.training_setup import build_setup

    config = _config(args)
    setup = build_setup(config, make_mesh(dict(config.mesh), devices=jax.devices()[:1]))
    rng = np.random.default_rng(0)
    leaves = leaf_paths(setup.abstract_state)

    def values():
        for name, leaf in leaves:
            if leaf.shape == ():
                yield name, np.zeros((), leaf.dtype)
            else:
                value = rng.standard_normal(leaf.shape, np.float32)
                yield name, np.abs(value) * 1e-4 if "/nu/" in name else value * 1e-2

    write_checkpoint(directory, 100, values(), model=dataclasses.asdict(setup.model_config),
                     optimizer=config.optimizer.to_dict(), structure=setup.abstract_state)
    sizes = [int(np.prod(leaf.shape)) * leaf.dtype.itemsize for _, leaf in leaves]
    return {"largest_tensor_bytes": max(sizes), "state_bytes": sum(sizes)}


def measure(source: str, destination: str, options: dict) -> int:
    """Peak RSS growth (bytes) of one conversion, in a fresh process."""
    script = f"""
import json, math, os, sys
sys.path.insert(0, {ROOT!r})
options = {options!r}
from efficient_train.config import parse_mesh_flag
mesh = parse_mesh_flag(options.pop("mesh"))
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={{math.prod(mesh.values())}}"
os.environ["JAX_PLATFORMS"] = "cpu"
from efficient_train.tools.convert import convert
import jax; jax.devices()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
before = status("VmRSS")
convert({source!r}, {destination!r}, mesh=mesh, **options)
print(json.dumps(status("VmHWM") - before))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory(prefix="convert_memory_") as tmp:
        sizes = write_source(args, os.path.join(tmp, "source"))
        print(json.dumps(sizes), flush=True)
        for index, (label, options) in enumerate(CONVERSIONS.items()):
            peak = measure(os.path.join(tmp, "source"), os.path.join(tmp, f"dst{index}"), dict(options))
            print(json.dumps({
                "conversion": label, "peak_growth_mib": round(peak / 2**20, 1),
                "x_largest_tensor": round(peak / sizes["largest_tensor_bytes"], 2),
                "x_state": round(peak / sizes["state_bytes"], 3),
            }), flush=True)


if __name__ == "__main__":
    main()
