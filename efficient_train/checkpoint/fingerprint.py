"""Per-leaf fingerprints that are the same on every mesh, on device and on the host.

A fingerprint is two position-weighted sums of the array's words (its elements'
bits read as unsigned integers of the same width) in wrapping uint32 arithmetic.
Integer addition modulo 2**32 is associative and commutative, so the result does not
depend on how the array is sharded or in which order devices reduce: a save computes
it from the sharded global array where it lies, and `verify` recomputes it from
the bytes on disk with numpy, chunk by chunk (bounded host memory). Every weight is
odd and a flipped bit changes its word by a power of two below 2**32, so flipping any
single bit changes both sums.

Who sums: on accelerators, the devices. Every shard is summed where it lives
(`shard_map`: each device weights its own block by the global flat index of its
elements) and the host adds the devices' rows; there is no collective, for the reason
`start_fingerprints` gives. Each block is reduced by halving it with elementwise adds
along each axis, for speed: XLA's CPU backend runs a plain integer `reduce` about five
times slower than a float one, while the halving adds vectorize. Arrays without a mesh
sharding must be whole on every device (one device, or replicated). On CPU devices and
for arrays in host memory (optimizer offload), numpy sums each block in place, with the
code `verify` runs on the saved bytes: there the device is the host, numpy's algebra
reads each word once, and the work can wait for a save's background commit, while a
device program would run one device's share in the calling thread.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from efficient_train.parallel.sharding import mesh_axes

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)
_OFFSETS = (0x27D4EB2F, 0x165667B1)
_HOST_CHUNK_BYTES = 1 << 24
_HALVING_STOP = 8  # halve each axis of a shard down to this length, then reduce the rest
_HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")
_PIECE_WORDS = 1 << 23  # a shard is halved in pieces of at most 32 MiB of words


_WORD = {1: (jnp.uint8, np.uint8), 2: (jnp.uint16, np.uint16), 4: (jnp.uint32, np.uint32)}


def _word_type(dtype: np.dtype) -> int:
    if dtype.itemsize not in _WORD:
        raise ValueError(f"fingerprint: {dtype} ({dtype.itemsize} bytes) is not a 1, 2 or 4 byte type")
    return dtype.itemsize


def _weighted_words(block: jax.Array, starts: tuple, global_shape: tuple[int, ...]) -> list[jax.Array]:
    """The two products word * weight(global flat index) for a block at `starts`."""
    words = jax.lax.bitcast_convert_type(block, _WORD[_word_type(np.dtype(block.dtype))][0]).astype(jnp.uint32)
    index = jnp.zeros((), jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) + starts[axis]
        index = index + position * np.uint32(stride % 2**32)
        stride *= global_shape[axis]
    return [words * ((index * np.uint32(m) + np.uint32(o)) | np.uint32(1)) for m, o in zip(_MULTIPLIERS, _OFFSETS)]


def _pieces(values: jax.Array) -> list[jax.Array]:
    """Static slices of at most _PIECE_WORDS words, split along the outermost axes."""
    if values.size <= _PIECE_WORDS:
        return [values]
    axis = next(a for a, length in enumerate(values.shape) if length > 1)
    length = values.shape[axis]
    step = -(-length // min(length, -(-values.size // _PIECE_WORDS)))
    return [piece for start in range(0, length, step)
            for piece in _pieces(jax.lax.slice_in_dim(values, start, min(start + step, length), axis=axis))]


def _halving_sum(values: jax.Array) -> jax.Array:
    """Wrapping sum of a local array: halve every axis with vector adds, then reduce the rest.

    Halving keeps the array's shape (no flattening), which is what lets XLA fuse the
    tree into a few vectorized passes; an odd length first peels its last slice. A
    large array is summed piece by piece: on one piece of hundreds of MiB XLA's CPU
    backend picks a fusion that writes half the array back and runs 4x slower.
    """
    total = jnp.zeros((), jnp.uint32)
    for piece in _pieces(values):
        for axis in reversed(range(piece.ndim)):
            while piece.shape[axis] > _HALVING_STOP:
                length = piece.shape[axis]
                if length % 2:
                    total = total + jnp.sum(jax.lax.index_in_dim(piece, length - 1, axis, keepdims=False), dtype=jnp.uint32)
                    length -= 1
                half = length // 2
                piece = jax.lax.slice_in_dim(piece, 0, half, axis=axis) + jax.lax.slice_in_dim(piece, half, length, axis=axis)
        total = total + jnp.sum(piece, dtype=jnp.uint32)
    return total


def _block_sums_on_device(block: jax.Array, starts: tuple, global_shape: tuple[int, ...]) -> jax.Array:
    """[2]: the two sums over a block at `starts` of a global array."""
    return jnp.stack([_halving_sum(p) for p in _weighted_words(block, starts, global_shape)])


def _per_device_sums(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """[devices, 2]: each device's sums over its own block; replicas other than the first give 0."""
    mesh = sharding.mesh
    dims = [mesh_axes(e) for e in sharding.spec] + [()] * (x.ndim - len(sharding.spec))
    used = {name for axes in dims for name in axes}

    def on_shard(block: jax.Array) -> jax.Array:
        starts = []
        for axes, size in zip(dims, block.shape):
            shard = jnp.zeros((), jnp.uint32)
            for name in axes:  # the first named axis is the most significant
                shard = shard * np.uint32(mesh.shape[name]) + jax.lax.axis_index(name).astype(jnp.uint32)
            starts.append(shard * np.uint32(size))
        sums = _block_sums_on_device(block, tuple(starts), x.shape)
        first_replica = jnp.ones((), jnp.bool_)
        for name in mesh.axis_names:
            if name not in used:
                first_replica = first_replica & (jax.lax.axis_index(name) == 0)
        return jnp.where(first_replica, sums, jnp.zeros_like(sums))[None]

    in_spec = PartitionSpec(*[axes or None for axes in dims])
    return jax.shard_map(on_shard, mesh=mesh, in_specs=in_spec, out_specs=PartitionSpec(mesh.axis_names),
                         check_vma=False)(x)


def _whole_sums(x: jax.Array) -> jax.Array:
    return _block_sums_on_device(x, (np.uint32(0),) * x.ndim, x.shape)[None]


@functools.partial(jax.jit, static_argnums=1)
def _sums_program(arrays: tuple[jax.Array, ...], shardings: tuple[NamedSharding | None, ...]) -> tuple[jax.Array, ...]:
    """One program for many arrays: a save dispatches once for all its small leaves."""
    return tuple(_whole_sums(x) if s is None else _per_device_sums(x, s) for x, s in zip(arrays, shardings))


Where = Literal["auto", "device", "host"]


@dataclasses.dataclass(frozen=True)
class _HostBlocks:
    """This process's first-replica blocks of an array, as numpy views, summed when fetched."""

    blocks: tuple[tuple[np.ndarray, tuple[int, ...]], ...]
    global_shape: tuple[int, ...]


def _host_blocks(x: jax.Array) -> _HostBlocks:
    """Views of the blocks where they lie: on CPU devices and in host memory, numpy reads
    the buffer itself (no copy). A view keeps its buffer alive and out of donation, so the
    bytes cannot change before the sums are taken."""
    blocks = tuple((np.asarray(shard.data), tuple(index.start or 0 for index in shard.index))
                   for shard in x.addressable_shards if shard.replica_id == 0)
    return _HostBlocks(blocks, tuple(x.shape))


def _sums_on_host(x: jax.Array, where: Where) -> bool:
    if x.sharding.memory_kind in _HOST_MEMORY_KINDS:
        return True  # device programs cannot take host-memory arrays beside device ones
    if where == "auto":
        device: Any = next(iter(x.sharding.device_set))
        return device.platform == "cpu"
    return where == "host"


def _dispatch(arrays: Sequence[jax.Array], where: Where) -> list[jax.Array | _HostBlocks | None]:
    """Per array: its sums' rows on device ([devices, 2] or [1, 2]), its blocks to sum on
    the host, or None for an empty array."""
    groups: dict[tuple[frozenset, int | None], list[int]] = {}
    pending: list[jax.Array | _HostBlocks | None] = [None] * len(arrays)
    for i, x in enumerate(arrays):
        if not isinstance(x.sharding, NamedSharding) and not x.sharding.is_fully_replicated:
            raise ValueError(f"fingerprint: arrays sharded by {type(x.sharding).__name__} are not supported; "
                             "use a NamedSharding")
        if x.size and _sums_on_host(x, where):
            pending[i] = _host_blocks(x)
        elif x.size:  # a large array gets a program of its own: XLA runs it faster alone
            alone = i if x.size >= _PIECE_WORDS else None
            groups.setdefault((frozenset(x.sharding.device_set), alone), []).append(i)
    for members in groups.values():  # one program per set of devices for all small arrays
        shardings = tuple(arrays[i].sharding if isinstance(arrays[i].sharding, NamedSharding) else None for i in members)
        for i, rows in zip(members, _sums_program(tuple(arrays[i] for i in members), shardings)):
            pending[i] = rows
    return pending


def _local_sums(pending: Sequence[jax.Array | _HostBlocks | None]) -> np.ndarray:
    """[arrays, 2]: this process's share of each array's sums. Host blocks are summed by a
    few threads (numpy releases the GIL); device rows are fetched and added."""
    sums = np.zeros((len(pending), 2), np.uint32)
    jobs = [(i, block, starts, p.global_shape) for i, p in enumerate(pending) if isinstance(p, _HostBlocks)
            for block, starts in p.blocks]
    if jobs:
        with concurrent.futures.ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
            for (i, *_), block_sums in zip(jobs, pool.map(lambda job: _block_sums(*job[1:]), jobs)):
                sums[i] += block_sums
    for i, partials in enumerate(pending):
        if isinstance(partials, jax.Array):
            sums[i] = _device_rows_sum(partials)
    return sums


def _device_rows_sum(partials: jax.Array) -> np.ndarray:
    """This process's share of the sums: its devices' rows, or the replicated row on process 0."""
    if partials.shape[0] == 1:  # one row, replicated: counted once in all
        if jax.process_index() != 0:
            return np.zeros(2, np.uint32)
        return np.asarray(partials.addressable_shards[0].data)[0]
    rows = [np.asarray(shard.data) for shard in partials.addressable_shards]
    return np.asarray(np.sum(np.concatenate(rows), axis=0, dtype=np.uint32))


def _format(sums: np.ndarray) -> str:
    return "".join(f"{int(s):08x}" for s in sums)


def start_fingerprints(arrays: Sequence[jax.Array], *, where: Where = "auto") -> Callable[[], list[str]]:
    """Start every array's fingerprint now; the returned function waits for them.

    `where` picks who sums: "device" runs device programs, "host" numpy over the
    blocks in place, "auto" the host for arrays on CPU devices or in host memory (there
    the device *is* the host, and XLA's CPU client would run one device's share in the
    calling thread) and the devices otherwise. Host sums are taken when the function is
    called, so a save does that work in its background commit.

    The device programs hold no collective (each device sums its own block and the
    host adds the rows), so any number may be in flight beside the training step
    without a cross-device rendezvous to deadlock on, and the results can be fetched
    later from any thread. With several processes the sums of the other processes
    are needed too: they are gathered here, before returning, because that gather is
    a collective that every process must issue from its main thread in the same order.
    """
    pending = _dispatch(arrays, where)
    if jax.process_count() > 1:
        gathered = np.asarray(np.sum(multihost_utils.process_allgather(_local_sums(pending)), axis=0, dtype=np.uint32))
        fingerprints = [_format(sums) for sums in gathered]
        return lambda: fingerprints
    return lambda: [_format(sums) for sums in _local_sums(pending)]


def device_fingerprint(x: jax.Array, *, where: Where = "auto") -> str:
    """Fingerprint of a (possibly sharded, possibly multi-process) global array."""
    return start_fingerprints([x], where=where)()[0]


def _block_sums(block: np.ndarray, starts: Sequence[int], global_shape: Sequence[int]) -> np.ndarray:
    """The two sums over a block at `starts` of a global array, with numpy, 16 MiB at a time.

    No weight per element: with m and o odd, (i * m + o) | 1 equals i * m + o + (i & 1)
    (for even i the value is already odd; for odd i `| 1` adds one), so each sum is
    m * S1 + o * S0 + S_odd over S0 = sum(word), S1 = sum(word * i) and S_odd = the sum
    of the words at odd flat indices i. With the block seen as rows of its last axis,
    i = (the row's first index) + column, so all three follow from the row sums and the
    column sums (column sums split by the parity of the row's first index): two
    reductions per chunk, all modulo 2**32.
    """
    if block.ndim == 0:  # a scalar is word 0 of a one-word array
        block, starts, global_shape = block.reshape(1), (0,), (1,)
    if block.size == 0:  # both sums over no words
        return np.zeros(2, np.uint32)
    words = np.ascontiguousarray(block).view(_WORD[_word_type(block.dtype)][1])
    strides = [int(np.prod(global_shape[axis + 1:], dtype=object)) for axis in range(len(global_shape))]
    row_starts: np.ndarray = np.full(words.shape[:-1], starts[-1], np.uint64)  # global index of each row's first word
    for axis in range(words.ndim - 1):
        positions = np.arange(words.shape[axis], dtype=np.uint64) + np.uint64(starts[axis])
        row_starts = row_starts + (positions * np.uint64(strides[axis] % 2**64)).reshape(
            [-1 if a == axis else 1 for a in range(words.ndim - 1)])
    row_starts = row_starts.reshape(-1)
    rows = words.reshape(-1, words.shape[-1])
    width = min(rows.shape[1], _HOST_CHUNK_BYTES // 4)
    height = max(1, _HOST_CHUNK_BYTES // 4 // width)
    s0 = s1 = odd = 0
    for top in range(0, rows.shape[0], height):
        for left in range(0, rows.shape[1], width):
            chunk = rows[top:top + height, left:left + width]
            firsts = row_starts[top:top + height] + np.uint64(left)  # array arithmetic wraps without a warning
            row_sums = np.sum(chunk, axis=1, dtype=np.uint32)
            column_sums = np.asarray(np.sum(chunk, axis=0, dtype=np.uint32)).astype(np.uint64)
            odd_rows = (firsts & np.uint64(1)).astype(bool)  # rows whose first word sits at an odd index
            if odd_rows.all():
                from_odd_rows = column_sums
            elif odd_rows.any():
                from_odd_rows = np.asarray(np.sum(chunk[odd_rows], axis=0, dtype=np.uint32)).astype(np.uint64)
            else:
                from_odd_rows = np.zeros_like(column_sums)
            columns = np.arange(chunk.shape[1], dtype=np.uint64)
            s0 += int(np.sum(row_sums, dtype=np.uint64))
            s1 += int(np.sum(firsts * row_sums, dtype=np.uint64)) + int(np.sum(columns * column_sums, dtype=np.uint64))
            # Odd index: an odd column of a row that starts even, an even column of one that starts odd.
            odd += int(np.sum((column_sums - from_odd_rows)[1::2], dtype=np.uint64))
            odd += int(np.sum(from_odd_rows[0::2], dtype=np.uint64))
    return np.array([(s1 * m + s0 * o + odd) % 2**32 for m, o in zip(_MULTIPLIERS, _OFFSETS)], np.uint32)


def host_fingerprint(array: np.ndarray) -> str:
    """The same fingerprint from host memory, in chunks of 16 MiB."""
    return _format(_block_sums(array, (0,) * array.ndim, array.shape))
