"""Reading one saved leaf straight from a step directory, without a mesh or a model.

Orbax stores every leaf of the state as a zarr array inside one OCDBT key-value store
(`<step>/state`), keyed by the leaf's path joined with dots. Opening a single key with
tensorstore reads that leaf alone into host memory, which is what `verify`, `inspect`
and the naming of damaged leaves need: peak memory is one leaf, never the model.

A failed read is sorted by tensorstore's status code. Missing keys or files, bytes cut
short and failed checksums (NOT_FOUND, OUT_OF_RANGE, FAILED_PRECONDITION "not enough
data", DATA_LOSS) prove the step is damaged: `UnreadableLeaf`, a DamagedCheckpoint.
Anything else (permission denied, I/O errors, out of memory, a status we do not know)
proves nothing about the bytes: `CheckpointReadError`.
"""
from __future__ import annotations

import os

import numpy as np
import tensorstore as ts

from efficient_train.checkpoint.metadata import STATE_ITEM, CheckpointReadError, DamagedCheckpoint
from efficient_train.errors import first_line

DAMAGE_STATUS = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")


class UnreadableLeaf(DamagedCheckpoint):
    """A leaf whose stored bytes are missing, cut short or fail their checksums."""

    def __init__(self, step_dir: str, leaf: str, problem: str) -> None:
        super().__init__(f"{step_dir}: leaf {leaf}: {problem}")
        self.leaf, self.problem = leaf, problem


def _spec(step_dir: str, leaf: str) -> dict:
    base = os.path.abspath(os.path.join(step_dir, STATE_ITEM))
    return {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{base}", "path": leaf.replace("/", ".") + "/"},
    }


def read_leaf(step_dir: str, leaf: str) -> np.ndarray:
    """The saved global array of `leaf` ("params/embed/embedding"), as numpy.

    Raises UnreadableLeaf for proven damage, CheckpointReadError for any other failure.
    """
    try:
        return np.asarray(ts.open(_spec(step_dir, leaf), open=True).result().read().result())
    except MemoryError:
        raise CheckpointReadError(f"{step_dir}: leaf {leaf}: out of host memory reading it") from None
    except (ValueError, RuntimeError, OSError) as error:  # tensorstore raises ValueError with a status code
        line = first_line(error, 200)
        if line.split(":", 1)[0] in DAMAGE_STATUS:
            raise UnreadableLeaf(step_dir, leaf, f"unreadable ({line[:160]})") from None
        raise CheckpointReadError(f"{step_dir}: leaf {leaf}: cannot be read ({line}); "
                                  "this says nothing about its bytes") from None
