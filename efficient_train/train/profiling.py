"""A `jax.profiler` trace of a window of training steps (`profile.start_step`, `profile.steps`).

The trace goes to `<workdir>/profile` as TensorBoard's profile plugin reads it
(`plugins/profile/<run>/<host>.xplane.pb`) and, beside it, `perfetto_trace.json.gz`
for ui.perfetto.dev. Every step in the window runs inside
`jax.profiler.StepTraceAnnotation("train", step_num=N)`, N the step's number as in
metrics.jsonl (the first step is 1), so the viewers split the trace by step. The window
closes after its last step's results are ready (or when the loop ends first); a run
resumed past the start traces the rest of the window. Process 0 traces; a window that
the run never reaches writes nothing.
"""
from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from typing import Any

import jax


class ProfileWindow:
    """Starts the trace before the window's first step and stops it after its last."""

    def __init__(self, workdir: str, start_step: int, steps: int, enabled: bool) -> None:
        self.directory = os.path.join(workdir, "profile")
        self.first, self.last = start_step, start_step + steps - 1
        self.enabled = enabled and steps > 0
        self.tracing = False

    def step(self, number: int) -> AbstractContextManager[Any]:
        """The context step `number` runs in: opens the trace at the window's first step it meets."""
        if not self.enabled or not self.first <= number <= self.last:
            return contextlib.nullcontext()
        if not self.tracing:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.tracing = True
        return jax.profiler.StepTraceAnnotation("train", step_num=number)

    def after_step(self, number: int, outputs: Any) -> None:
        """Close the trace once the window's last step has finished computing."""
        if self.tracing and number >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
