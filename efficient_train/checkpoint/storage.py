"""Reading one saved leaf straight from a step directory, without a mesh or a model.

Orbax stores every leaf of the state as a zarr array inside one OCDBT key-value store
(`<step>/state`), keyed by the leaf's path joined with dots. Opening a single key with
tensorstore reads that leaf alone into host memory, which is what `verify`, `inspect`
and the naming of damaged leaves need: peak memory is one leaf, never the model.
"""
from __future__ import annotations

import os

import numpy as np
import tensorstore as ts

STATE_DIR = "state"


def _spec(step_dir: str, leaf: str) -> dict:
    base = os.path.abspath(os.path.join(step_dir, STATE_DIR))
    return {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{base}", "path": leaf.replace("/", ".") + "/"},
    }


def read_leaf(step_dir: str, leaf: str) -> np.ndarray:
    """The saved global array of `leaf` ("params/embed/embedding"), as numpy."""
    return np.asarray(ts.open(_spec(step_dir, leaf), open=True).result().read().result())
