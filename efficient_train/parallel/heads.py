"""Ulysses' head rule, plain arithmetic with no imports, so config.py can use it without jax.

Ulysses trades the sequence split for a head split with an all-to-all, so the query
heads must divide evenly over the `sequence` axis, and the key/value heads must either
divide evenly too or be repeated up to one per device (a count that divides the axis).
`config._sequence_parallel_problem` (refusing a config) and `ulysses.check_heads`
(inside the step) both ask `ulysses_head_problem` and word the answer for their reader.
"""
from __future__ import annotations


def ulysses_head_problem(num_heads: int, num_kv_heads: int, size: int) -> str | None:
    """Which head count Ulysses cannot split over `size` devices: "num_heads", "num_kv_heads", or None."""
    if num_heads % size:
        return "num_heads"
    if num_kv_heads % size and size % num_kv_heads:
        return "num_kv_heads"
    return None
