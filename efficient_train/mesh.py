"""The device mesh from the config, and the multi-host start through jax.distributed.

Axes, outer to inner: replica, data, sequence, tensor (DESIGN.md). Every axis is
`AxisType.Auto`: the trainer states shardings on its inputs and outputs and lets the
compiler propagate them through the model (the usual choice for a trainer); the few
places that must state their collectives (ZeRO gradient reduction, attention under
sequence parallelism) do so inside `jax.shard_map`, manual over the axes they own.
jax 0.10's `jax.make_mesh` would otherwise default to Explicit axes.
"""
from __future__ import annotations

import dataclasses
import os

import jax
from jax.sharding import AxisType, Mesh

from efficient_train.config import MESH_AXES


def make_mesh(shape: dict[str, int], devices: list | None = None) -> Mesh:
    """A mesh with the four named axes in their fixed order, all of type Auto."""
    sizes = tuple(shape[axis] for axis in MESH_AXES)
    kwargs = {} if devices is None else {"devices": devices}
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), **kwargs)


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    """Where the coordinator is and who this process is; empty when single-process."""

    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0

    @property
    def is_multi_process(self) -> bool:
        return self.num_processes > 1


def distributed_args_from_env(flags: DistributedArgs) -> DistributedArgs:
    """Flags win; then EFFICIENT_TRAIN_{COORDINATOR,NUM_PROCESSES,PROCESS_ID}; then SLURM.

    Under SLURM (SLURM_NTASKS > 1) the coordinator is left to jax's own cluster
    detection, which reads the node list; so an empty coordinator with
    num_processes > 1 means "ask the cluster".
    """
    if flags.is_multi_process:
        return flags
    env = os.environ
    if "EFFICIENT_TRAIN_NUM_PROCESSES" in env:
        return DistributedArgs(
            coordinator=env.get("EFFICIENT_TRAIN_COORDINATOR", ""),
            num_processes=int(env["EFFICIENT_TRAIN_NUM_PROCESSES"]),
            process_id=int(env.get("EFFICIENT_TRAIN_PROCESS_ID", "0")),
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistributedArgs(
            coordinator="",
            num_processes=int(env["SLURM_NTASKS"]),
            process_id=int(env.get("SLURM_PROCID", "0")),
        )
    return flags


def initialize_distributed(args: DistributedArgs) -> None:
    """Start jax.distributed for a multi-process run; a no-op for one process.

    On the CPU backend cross-process collectives need gloo, which must be chosen
    before the backend starts (the setting is ignored by GPU and TPU backends).
    """
    if not args.is_multi_process:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    else:
        jax.distributed.initialize()

