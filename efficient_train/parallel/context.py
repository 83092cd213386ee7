"""A value that holds while the train step is traced: the one pattern behind ZeRO-3 gathers and sequence parallelism.

The step opens a context (`with context.holding(value):`) around tracing the model,
and code deep inside the model asks `context.current()` instead of threading the
value through every call. It is thread-local, so two steps traced on two threads do
not see each other's values, and nested contexts restore the outer value on exit.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class TracingContext(Generic[T]):
    """One named value, None outside any `holding` context."""

    def __init__(self, name: str):
        self.name = name
        self._local = threading.local()

    def current(self) -> T | None:
        return getattr(self._local, "value", None)

    @contextlib.contextmanager
    def holding(self, value: T) -> Iterator[None]:
        previous = self.current()
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = previous
