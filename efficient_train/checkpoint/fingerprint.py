"""Per-leaf fingerprints that are the same on every mesh, on device and on the host.

A fingerprint is two position-weighted sums of the array's bytes in wrapping uint32
arithmetic. Integer addition modulo 2**32 is associative and commutative, so the
result does not depend on how the array is sharded or in which order devices reduce:
the device computes it on the sharded global array at save time, and `verify` recomputes
it from the bytes on disk with numpy, chunk by chunk (bounded host memory). Every
weight is odd, so flipping any single bit changes both sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)
_OFFSETS = (0x27D4EB2F, 0x165667B1)
_HOST_CHUNK_BYTES = 1 << 24


@jax.jit
def _device_sums(x: jax.Array) -> jax.Array:
    data = jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, data.shape[0])
    sums = [
        jnp.sum(data * ((index * np.uint32(m) + np.uint32(o)) | np.uint32(1)), dtype=jnp.uint32)
        for m, o in zip(_MULTIPLIERS, _OFFSETS)
    ]
    return jnp.stack(sums)


def _format(sums: np.ndarray) -> str:
    return "".join(f"{int(s):08x}" for s in sums)


def device_fingerprint(x: jax.Array) -> str:
    """Fingerprint of a (possibly sharded, possibly multi-process) global array."""
    if x.size == 0:
        return _format(np.zeros(2, np.uint32))
    return _format(np.asarray(jax.device_get(_device_sums(x))))


def host_fingerprint(array: np.ndarray) -> str:
    """The same fingerprint from host bytes, in chunks of 16 MiB."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    sums = np.zeros(2, np.uint32)
    for start in range(0, data.size, _HOST_CHUNK_BYTES):
        chunk = data[start : start + _HOST_CHUNK_BYTES].astype(np.uint32)
        index = np.arange(start, start + chunk.size, dtype=np.uint64).astype(np.uint32)
        for i, (m, o) in enumerate(zip(_MULTIPLIERS, _OFFSETS)):
            weights = (index * np.uint32(m) + np.uint32(o)) | np.uint32(1)
            sums[i] += np.sum(chunk * weights, dtype=np.uint32)
    return _format(sums)
