"""Restore across a matrix of meshes, in both directions: a state saved on any of 1, 2,
4x2, 8 devices or a data x tensor mesh restores byte-identically onto each of the others
with the target's shardings, and saving it again there gives the same fingerprints."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.checkpoint import Checkpointer, leaf_paths, read_metadata

MESHES = {  # name: (data, tensor)
    "1": (1, 1),
    "2": (2, 1),
    "4x2": (4, 2),
    "8": (8, 1),
    "data2xtensor4": (2, 4),
}
LEAVES = {  # shapes with dims that some meshes cannot split (odd, 3, 6): those stay whole
    "params/embed": ((64, 48), jnp.float32),
    "params/blocks/w": ((4, 48, 96), jnp.bfloat16),
    "params/norm": ((6,), jnp.float32),
    "opt/codes": ((4, 48, 96), jnp.int8),
    "opt/scales": ((4, 48, 3), jnp.float32),
    "step": ((), jnp.int32),
}


def _mesh(name: str) -> jax.sharding.Mesh:
    data, tensor = MESHES[name]
    return jax.make_mesh((data, tensor), ("data", "tensor"), devices=jax.devices()[:data * tensor])


def _spec(shape: tuple, mesh: jax.sharding.Mesh) -> P:
    """`data` on the first dim it divides, `tensor` on the last other dim it divides."""
    dims = [None] * len(shape)
    for axis, order in (("data", range(len(shape))), ("tensor", reversed(range(len(shape))))):
        size = mesh.shape[axis]
        for dim in order:
            if size > 1 and dims[dim] is None and shape[dim] % size == 0:
                dims[dim] = axis
                break
    return P(*dims)


def _tree(leaves: dict) -> dict:
    return unflatten_dict(leaves, sep="/")


def _shardings(mesh: jax.sharding.Mesh) -> dict:
    return {name: NamedSharding(mesh, _spec(shape, mesh)) for name, (shape, _) in LEAVES.items()}


@pytest.fixture(scope="module")
def host_values() -> dict:
    rng = np.random.default_rng(0)
    values = {}
    for name, (shape, dtype) in LEAVES.items():
        if jnp.issubdtype(dtype, jnp.integer):
            values[name] = rng.integers(-128, 128, shape).astype(dtype)
        else:
            values[name] = (rng.standard_normal(shape) * 3).astype(dtype)
    return values


@pytest.fixture(scope="module")
def saved(tmp_path_factory, host_values) -> dict:
    """Mesh name -> a Checkpointer holding step 1, saved from that mesh."""
    checkpointers = {}
    for name in MESHES:
        shardings = _shardings(_mesh(name))
        state = _tree({leaf: jax.device_put(value, shardings[leaf]) for leaf, value in host_values.items()})
        checkpointer = Checkpointer(str(tmp_path_factory.mktemp(f"saved_on_{name}")), keep=0, keep_every=0,
                                    async_save=False)
        checkpointer.save(1, state, model={}, mesh=dict(_mesh(name).shape), zero_stage=3, optimizer={}, data=None, seed=0)
        checkpointers[name] = checkpointer
    return checkpointers


@pytest.mark.parametrize("source", sorted(MESHES))
def test_restores_byte_identically_onto_every_other_mesh(source, saved, host_values, tmp_path):
    fingerprints = {leaf: r.fingerprint for leaf, r in read_metadata(saved[source].step_dir(1)).leaves.items()}
    for target in sorted(set(MESHES) - {source}):
        shardings = _shardings(_mesh(target))
        abstract = _tree({leaf: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[leaf])
                          for leaf, (shape, dtype) in LEAVES.items()})
        restored, metadata = saved[source].restore_step(1, abstract, model={})
        assert metadata.mesh == dict(_mesh(source).shape)
        for leaf, array in leaf_paths(restored):
            assert array.sharding == shardings[leaf], (source, target, leaf)
            np.testing.assert_array_equal(np.asarray(array), host_values[leaf], err_msg=f"{source} -> {target}: {leaf}")
        # Save A, restore on B, save A': the same fingerprints, so the same bytes.
        again = Checkpointer(str(tmp_path / target), keep=0, keep_every=0, async_save=False)
        again.save(1, restored, model={}, mesh=dict(_mesh(target).shape), zero_stage=3, optimizer={}, data=None, seed=0)
        resaved = {leaf: r.fingerprint for leaf, r in read_metadata(again.step_dir(1)).leaves.items()}
        assert resaved == fingerprints, (source, target)
        again.close()
