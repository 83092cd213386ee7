"""Reading collectives out of compiled HLO text, for tests that assert what a step runs."""
from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(?:f32|bf16|f16|s32|u32|s8|u8|pred|f8e4m3fn|f64)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    shapes: tuple[tuple[int, ...], ...]  # result shapes (several for a tuple-shaped op)

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
            found.append(Collective(op, shapes))
    return found


def ops(hlo_text: str) -> set[str]:
    return {c.op for c in collectives(hlo_text)}
