"""Reading collectives out of compiled HLO text, for tests that assert what a step runs."""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(?:f32|bf16|f16|s32|u32|s8|u8|pred|f8e4m3fn|f64)\[([0-9,]*)\]")


_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")

Groups = frozenset[frozenset[int]]


def replica_groups(line: str) -> Groups | None:
    """The device groups of one collective's HLO line: explicit ({{0,2},{1,3}}) or iota
    ([G,S]<=[dims]T(perm): iota over the dims, transposed by perm, read as G groups of S)."""
    explicit = _EXPLICIT_GROUPS.search(line)
    if explicit:
        return frozenset(frozenset(int(d) for d in group.split(",") if d)
                         for group in re.findall(r"\{([0-9,]*)\}", explicit.group(1)))
    iota = _IOTA_GROUPS.search(line)
    if not iota:
        return None
    shape, dims = ([int(d) for d in part.split(",")] for part in iota.groups()[:2])
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(3):
        ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
    return frozenset(frozenset(int(d) for d in row) for row in ids.reshape(shape[0], -1))


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    shapes: tuple[tuple[int, ...], ...]  # result shapes (several for a tuple-shaped op)
    groups: Groups | None = None  # the device groups it runs over (None: not written in the line)

    @property
    def largest(self) -> int:
        return max((math.prod(shape) for shape in self.shapes), default=0)


def collectives(hlo_text: str) -> list[Collective]:
    found = []
    for line in hlo_text.splitlines():
        for op in COLLECTIVES:
            marker = f" {op}("
            start_marker = f" {op}-start("
            where = line.find(marker) if marker in line else line.find(start_marker)
            if where < 0 or "=" not in line[:where]:
                continue
            result = line[line.index("=") + 1 : where]
            shapes = tuple(tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(result))
            found.append(Collective(op, shapes, replica_groups(line)))
    return found


def ops(hlo_text: str) -> set[str]:
    return {c.op for c in collectives(hlo_text)}
