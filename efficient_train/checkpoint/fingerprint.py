"""Per-leaf fingerprints that are the same on every mesh, on device and on the host.

A fingerprint is two position-weighted sums of the array's words (its elements'
bits read as unsigned integers of the same width) in wrapping uint32 arithmetic. Integer addition modulo 2**32 is associative and commutative, so the
result does not depend on how the array is sharded or in which order devices reduce:
the device computes it on the sharded global array at save time, and `verify` recomputes
it from the bytes on disk with numpy, chunk by chunk (bounded host memory). Every
weight is odd and a flipped bit changes its word by a power of two below 2**32, so
flipping any single bit changes both sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)
_OFFSETS = (0x27D4EB2F, 0x165667B1)
_HOST_CHUNK_BYTES = 1 << 24


_WORD = {1: (jnp.uint8, np.uint8), 2: (jnp.uint16, np.uint16), 4: (jnp.uint32, np.uint32)}


def _word_type(dtype: np.dtype) -> int:
    if dtype.itemsize not in _WORD:
        raise ValueError(f"fingerprint: {dtype} ({dtype.itemsize} bytes) is not a 1, 2 or 4 byte type")
    return dtype.itemsize


@jax.jit
def _device_sums(x: jax.Array) -> jax.Array:
    words = jax.lax.bitcast_convert_type(x, _WORD[_word_type(np.dtype(x.dtype))][0]).astype(jnp.uint32)
    # The flat (row-major) index of every element, built from per-axis iotas so no
    # reshape is needed (a reshape of a sharded array may need a resharding).
    index = jnp.zeros((), jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    sums = [
        jnp.sum(words * ((index * np.uint32(m) + np.uint32(o)) | np.uint32(1)), dtype=jnp.uint32)
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
    """The same fingerprint from host memory, in chunks of 16 MiB."""
    words = np.ascontiguousarray(array).reshape(-1).view(_WORD[_word_type(array.dtype)][1])
    chunk_words = _HOST_CHUNK_BYTES // words.itemsize
    sums = np.zeros(2, np.uint32)
    for start in range(0, words.size, chunk_words):
        chunk = words[start : start + chunk_words].astype(np.uint32)
        index = np.arange(start, start + chunk.size, dtype=np.uint64).astype(np.uint32)
        for i, (m, o) in enumerate(zip(_MULTIPLIERS, _OFFSETS)):
            weights = (index * np.uint32(m) + np.uint32(o)) | np.uint32(1)
            sums[i] += np.sum(chunk * weights, dtype=np.uint32)
    return _format(sums)
