"""The `efficient-train` command: `train`, `estimate` and `checkpoint` tools.

    efficient-train train [--config FILE] [--config.FIELD=VALUE ...] [--workdir DIR]
                          [--coordinator HOST:PORT --num_processes N --process_id I]
                          [--devices N]
    efficient-train estimate [--config FILE] [--config.FIELD=VALUE ...] [--devices N] [--json]
    efficient-train checkpoint inspect|verify CKPT

A bad config or flag prints one line naming the field and what is allowed, and exits
with status 2. jax is imported only after the flags are read, because the simulated
CPU device count (`--devices`, and for `estimate` the mesh's size) must be set before
jax starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from efficient_train.checkpoint.metadata import CheckpointError
from efficient_train.config import MESH_AXES, ConfigError, apply_overrides, get_config


class UsageError(Exception):
    """A command-line problem: printed as one line, exit status 2."""


def _split_overrides(extra: Sequence[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--config."):
            raise UsageError(f"unrecognized argument {item!r}; config fields are set as --config.FIELD=VALUE")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            if not items:
                raise UsageError(f"--config.{key}: missing value")
            value = items.pop(0)
        overrides[key] = value
    return overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efficient-train", description="Distributed LLM training on JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a model; resumes from the newest checkpoint in the work directory"),
                            ("estimate", "per-device memory of a config's train step, compile only")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", default=None, help="a configs/*.py file (default: the tiny recipe)")
        sub.add_argument("--devices", type=int, default=None, help="simulate N CPU devices")
        if name == "estimate":
            sub.add_argument("--json", action="store_true", help="print one JSON record instead of a table")
        if name == "train":
            sub.add_argument("--workdir", default=None, help="where metrics.jsonl (and later checkpoints) go")
            sub.add_argument("--coordinator", default="", help="host:port of process 0 for multi-process runs")
            sub.add_argument("--num_processes", type=int, default=1)
            sub.add_argument("--process_id", type=int, default=0)
    checkpoint = commands.add_parser("checkpoint", help="inspect or verify a saved checkpoint")
    tools = checkpoint.add_subparsers(dest="tool", required=True)
    for name, help_text in (("inspect", "table of leaves, shapes, dtypes, bytes; step, mesh at save, formats"),
                            ("verify", "recompute every leaf's fingerprint; exit 1 naming damaged leaves")):
        tools.add_parser(name, help=help_text).add_argument("ckpt", help="a checkpoint directory or one step in it")
    return parser


def _checkpoint(args: argparse.Namespace) -> int:
    from efficient_train.checkpoint.tools import inspect_text, verify_text

    if args.tool == "inspect":
        print(inspect_text(args.ckpt))
        return 0
    ok, text = verify_text(args.ckpt)
    print(text)
    return 0 if ok else 1


def _simulate_devices(count: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _train(args: argparse.Namespace, config) -> int:
    from efficient_train.mesh import DistributedArgs, distributed_args_from_env, initialize_distributed

    initialize_distributed(distributed_args_from_env(DistributedArgs(args.coordinator, args.num_processes, args.process_id)))
    from efficient_train.train import Trainer

    trainer = Trainer(config)
    final = trainer.fit()
    if trainer.is_main:
        print(json.dumps({"final": final}))
    return 0


def _estimate(config, as_json: bool) -> int:
    from efficient_train.train.estimate import estimate_memory, format_estimate

    estimate = estimate_memory(config)
    print(json.dumps(estimate) if as_json else format_estimate(config, estimate))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command == "checkpoint":
            if extra:
                raise UsageError(f"unrecognized arguments {' '.join(extra)}")
            return _checkpoint(args)
        config = get_config(args.config)
        apply_overrides(config, _split_overrides(extra))
        if args.command == "train" and args.workdir:
            config.workdir = args.workdir
        devices = args.devices
        if devices is None and args.command == "estimate":
            sizes = [config.mesh[axis] for axis in MESH_AXES]
            devices = math.prod(sizes) if -1 not in sizes else None
            if devices is None:
                raise UsageError("mesh: estimate needs every mesh axis sized (no -1), or --devices N")
        if devices is not None:
            if devices < 1:
                raise UsageError(f"--devices: {devices} must be a positive integer")
            _simulate_devices(devices)
        return _train(args, config) if args.command == "train" else _estimate(config, args.json)
    except (ConfigError, UsageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
