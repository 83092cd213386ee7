"""The device mesh from the config, and the multi-host start through jax.distributed.

Axes, outer to inner: replica, data, expert, sequence, tensor (ARCHITECTURE.md). Every axis is
`AxisType.Auto`: the trainer states shardings on its inputs and outputs and lets the
compiler propagate them through the model (the usual choice for a trainer); the few
places that must state their collectives (ZeRO gradient reduction, attention under
sequence parallelism) do so inside `jax.shard_map`, manual over the axes they own.
jax 0.10's `jax.make_mesh` would otherwise default to Explicit axes.

jax is imported inside the functions that need it, so the CLI can read and check the
multi-process flags and environment (`distributed_args_from_env`) before jax starts:
a bad launch setting is one `LaunchError` line (exit 2), never a hang or traceback
inside `jax.distributed.initialize`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from efficient_train.errors import InputError
from efficient_train.parallel.axes import MESH_AXES

if TYPE_CHECKING:
    from jax.sharding import Mesh

# Environment markers of the clusters whose coordinator jax finds by itself
# (jax._src.clusters: SLURM, Open MPI); elsewhere a multi-process run needs an address.
_CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri")


class LaunchError(InputError):
    """A multi-process launch setting (flag or environment variable) is wrong; one line naming it."""


def make_mesh(shape: dict[str, int], devices: list | None = None) -> Mesh:
    """A mesh with the named axes in their fixed order, all of type Auto; an axis `shape` leaves out has size 1."""
    import jax
    from jax.sharding import AxisType

    sizes = tuple(shape.get(axis, 1) for axis in MESH_AXES)
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


def _env_int(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        return int(str(text).strip())
    except ValueError:
        raise LaunchError(f"{name}: {text!r} is not an integer; set it to a whole number (or unset it)") from None


def check_distributed_args(args: DistributedArgs, names: tuple[str, str, str] = (
        "--coordinator", "--num_processes", "--process_id")) -> DistributedArgs:
    """Refuse inconsistent settings, naming the flag or variable (`names`) they came from."""
    coordinator, num_processes, process_id = names
    if args.num_processes < 1:
        raise LaunchError(f"{num_processes}: {args.num_processes} must be a positive integer (1 = single process)")
    if args.process_id < 0:
        raise LaunchError(f"{process_id}: {args.process_id} must be >= 0")
    if args.process_id >= args.num_processes:
        raise LaunchError(f"{process_id}: {args.process_id} must be below {num_processes} = {args.num_processes} "
                          f"(processes are numbered 0 to {args.num_processes - 1})")
    if args.coordinator:
        host, sep, port = args.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise LaunchError(f"{coordinator}: {args.coordinator!r} is not HOST:PORT with PORT in 1..65535 "
                              "(the address of process 0)")
    elif args.is_multi_process and not any(marker in os.environ for marker in _CLUSTER_MARKERS):
        raise LaunchError(f"{num_processes}: {args.num_processes} processes need {coordinator} HOST:PORT "
                          "(the address of process 0); only under SLURM or Open MPI does jax find it itself")
    return args


def distributed_args_from_env(flags: DistributedArgs) -> DistributedArgs:
    """Flags win; then EFFICIENT_TRAIN_{COORDINATOR,NUM_PROCESSES,PROCESS_ID}; then SLURM.

    Under SLURM (SLURM_NTASKS > 1) the coordinator is left to jax's own cluster
    detection, which reads the node list; so an empty coordinator with
    num_processes > 1 means "ask the cluster". Whatever the source, the result is
    checked (`check_distributed_args`) and an error names the flag or variable.
    """
    if flags.is_multi_process or flags.process_id != 0 or flags.num_processes < 1:
        return check_distributed_args(flags)
    env = os.environ
    if "EFFICIENT_TRAIN_NUM_PROCESSES" in env:
        args = DistributedArgs(
            coordinator=env.get("EFFICIENT_TRAIN_COORDINATOR", "").strip(),
            num_processes=_env_int("EFFICIENT_TRAIN_NUM_PROCESSES"),
            process_id=_env_int("EFFICIENT_TRAIN_PROCESS_ID", "0"),
        )
        return check_distributed_args(args, ("EFFICIENT_TRAIN_COORDINATOR", "EFFICIENT_TRAIN_NUM_PROCESSES",
                                             "EFFICIENT_TRAIN_PROCESS_ID"))
    if _env_int("SLURM_NTASKS", "1") > 1:
        args = DistributedArgs(
            coordinator="",
            num_processes=_env_int("SLURM_NTASKS"),
            process_id=_env_int("SLURM_PROCID", "0"),
        )
        return check_distributed_args(args, ("--coordinator", "SLURM_NTASKS", "SLURM_PROCID"))
    return check_distributed_args(flags)


def initialize_distributed(args: DistributedArgs) -> None:
    """Start jax.distributed for a multi-process run; a no-op for one process.

    On the CPU backend cross-process collectives need gloo, which must be chosen
    before the backend starts (the setting is ignored by GPU and TPU backends).
    """
    check_distributed_args(args)
    if not args.is_multi_process:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    else:
        jax.distributed.initialize()
