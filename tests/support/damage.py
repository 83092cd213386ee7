"""Damaging a saved step the way a disk does, for the tests that must detect it."""
from __future__ import annotations

import glob
import os


def array_files(step_dir: str) -> list[str]:
    """The data files of a step's arrays (Orbax's OCDBT `d/` files)."""
    return sorted(f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
                  if os.path.isfile(f))


def flip_a_byte(step_dir: str, *, mask: int = 0x10, where: float = 0.5) -> str:
    """XOR one byte of the step's largest array file with `mask`, at fraction `where` of it;
    returns that file."""
    largest = max(array_files(step_dir), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(int(os.path.getsize(largest) * where))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ mask]))
    return largest
