"""Leaf fingerprints: numpy's equals the format's definition computed element by element,
the devices' per-shard programs and numpy's sums of the blocks in place (CPU devices,
host memory) equal numpy's over the saved bytes on every layout, and any flipped bit or
moved element changes them. scripts/check_fingerprints.py, the same comparison for the
GPU (scripts/bench_gpu.sh), passes here and fails when the device path is off."""
from __future__ import annotations

import importlib.util
import os
import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from efficient_train.checkpoint import fingerprint
from efficient_train.checkpoint.fingerprint import device_fingerprint, host_fingerprint, start_fingerprints

LAYOUTS = [
    ((), P()),
    ((7,), P()),
    ((8,), P("data")),
    ((16,), P(("data", "tensor"))),
    ((4, 6, 8), P(None, "data", "tensor")),
    ((8, 12), P("tensor", "data")),
    ((8, 12), P(("tensor", "data"))),
    ((6, 2051), P("data")),  # an odd last axis: halving peels a slice
    ((3001,), P()),
    ((2, 9, 5, 40), P(None, None, None, "tensor")),
]
DTYPES = [np.float32, jax.numpy.bfloat16, np.float16, np.int8, np.uint8, np.int32]


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "tensor"))


def _random(shape, dtype, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)


def _by_definition(array: np.ndarray) -> str:
    """The fingerprint as the format defines it, element by element with Python integers:
    sum(word * ((i * m + o) mod 2**32 | 1)) mod 2**32 over the flat index i, for each (m, o)."""
    words = [int(w) for w in np.ascontiguousarray(array).reshape(-1).view(f"u{array.dtype.itemsize}")]
    sums = [sum(w * (((i * m + o) % 2**32) | 1) for i, w in enumerate(words)) % 2**32
            for m, o in zip(fingerprint._MULTIPLIERS, fingerprint._OFFSETS)]
    return "".join(f"{s:08x}" for s in sums)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_host_fingerprint_is_the_defined_one(dtype, monkeypatch):
    """Checkpoints already on disk verify only while the definition holds."""
    monkeypatch.setattr(fingerprint, "_HOST_CHUNK_BYTES", 64)  # chunks split rows and columns
    for shape, _ in LAYOUTS:
        host = _random(shape, dtype, seed=7)
        assert host_fingerprint(host) == _by_definition(host), shape


WHERE = ["device", "host"]  # "auto" picks "host" on these CPU devices


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_device_fingerprint_equals_the_host_one_on_every_layout(mesh, dtype, where):
    for shape, spec in LAYOUTS:
        host = _random(shape, dtype)
        expected = host_fingerprint(host)
        assert device_fingerprint(jax.device_put(host, NamedSharding(mesh, spec)), where=where) == expected, (shape, spec)
    single = jax.device_put(host, SingleDeviceSharding(jax.devices()[5]))
    assert device_fingerprint(single, where=where) == expected


def test_auto_sums_cpu_arrays_on_the_host_in_place():
    """On CPU devices "auto" takes numpy views of the blocks (no device program, no copy)."""
    array = jax.device_put(_random((8, 64), np.float32), NamedSharding(jax.make_mesh((8,), ("data",)), P("data")))
    (pending,) = fingerprint._dispatch([array], "auto")
    assert isinstance(pending, fingerprint._HostBlocks)
    assert [view.ctypes.data for view, _ in pending.blocks] == [s.data.unsafe_buffer_pointer() for s in array.addressable_shards]


def test_arrays_in_host_memory_give_the_same_fingerprint(mesh):
    for shape, spec in LAYOUTS:
        host = _random(shape, np.float32, seed=4)
        offloaded = jax.device_put(host, NamedSharding(mesh, spec, memory_kind="pinned_host"))
        assert device_fingerprint(offloaded) == host_fingerprint(host), (shape, spec)


def test_large_shards_summed_in_pieces_give_the_same_fingerprint(mesh, monkeypatch):
    monkeypatch.setattr(fingerprint, "_PIECE_WORDS", 64)  # shapes below are new to the jit caches
    for shape, spec in [((6, 8, 33), P("data")), ((1, 1, 1001), P()), ((10, 36), P(None, "tensor"))]:
        host = _random(shape, np.float32, seed=3)
        assert device_fingerprint(jax.device_put(host, NamedSharding(mesh, spec)), where="device") == host_fingerprint(host), shape


@pytest.mark.parametrize("where", WHERE)
def test_a_flipped_bit_or_swapped_elements_change_both_sums(mesh, where):
    host = _random((8, 12), np.float32)
    sharding = NamedSharding(mesh, P("tensor", "data"))
    original = device_fingerprint(jax.device_put(host, sharding), where=where)
    words = host.view(np.uint32)
    for flat_index, bit in [(0, 0), (37, 31), (95, 13)]:
        damaged = words.copy().reshape(-1)
        damaged[flat_index] ^= np.uint32(1 << bit)
        changed = device_fingerprint(jax.device_put(damaged.reshape(host.shape).view(np.float32), sharding), where=where)
        assert changed[:8] != original[:8] and changed[8:] != original[8:]
    swapped = host.copy()
    swapped[[2, 5]] = swapped[[5, 2]]  # rows that live on different devices
    assert device_fingerprint(jax.device_put(swapped, sharding), where=where) != original


@pytest.mark.parametrize("where", WHERE)
def test_fingerprints_dispatched_now_are_fetched_from_another_thread(mesh, where):
    arrays = [jax.device_put(_random((8, 64), np.float32, seed), NamedSharding(mesh, P("data", "tensor")))
              for seed in range(3)] + [jax.device_put(np.zeros((0, 4), np.float32), NamedSharding(mesh, P()))]
    fetch = start_fingerprints(arrays, where=where)
    fetched = []
    worker = threading.Thread(target=lambda: fetched.extend(fetch()))
    worker.start()
    worker.join()
    assert fetched == [host_fingerprint(np.asarray(a)) for a in arrays]
    assert len(set(fetched)) == 4


def _fingerprint_check_script():
    """scripts/check_fingerprints.py, which scripts/bench_gpu.sh runs on the GPU first."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "check_fingerprints.py")
    spec = importlib.util.spec_from_file_location("check_fingerprints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fingerprint_check_script_passes_on_the_cpu_devices():
    """The GPU's check, here on the 8 CPU devices: every dtype and layout, device == host.
    (Its large arrays stay small here; summing in pieces has its own test above.)"""
    script = _fingerprint_check_script()
    problems, checked = script.check(large_elements=3000)
    assert problems == [] and checked == len(script.DTYPE_NAMES) * 12  # pinned_host works on CPU


def test_fingerprint_check_script_names_what_differs(monkeypatch, capsys):
    """A device path that disagrees with the host (here: its sums' fetch adds 1) fails the
    check, naming each array the devices summed, and the script exits 1."""
    def off_by_one(partials):
        return _device_rows_sum(partials) + np.uint32(1)

    _device_rows_sum = fingerprint._device_rows_sum
    monkeypatch.setattr(fingerprint, "_device_rows_sum", off_by_one)
    script = _fingerprint_check_script()
    monkeypatch.setattr(script, "DTYPE_NAMES", ("bfloat16", "uint8"))
    assert script.main(["--large-elements", "3000"]) == 1
    mismatches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("MISMATCH")]
    # every array but the empty one and the one in host memory (summed on the host either way)
    assert len(mismatches) == 2 * 10 and any(line.startswith("MISMATCH bfloat16[7] P()") for line in mismatches)
