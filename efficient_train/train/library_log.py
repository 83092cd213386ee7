"""Where the libraries' own messages go during a command-line run: a log file, not the console.

When a background checkpoint write fails, Orbax logs the failure from each of its
threads (with tracebacks) and tensorstore's callbacks raise "unraisable" errors into a
closed event loop: about 28 tracebacks around the one line that says what happened.
Those messages are kept, for whoever debugs the failure, in
`<workdir>/logs/process_<i>.log`; the console keeps the progress bar and our own lines,
and an error line ends by naming that file.

Only the command line routes output like this: a program that imports the trainer
keeps its own logging configuration.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

_state: dict[str, Any] = {}


class _BestEffortLog:
    """The log file, written unbuffered, where a failed write is dropped: the log is kept for
    whoever debugs a failure, and a full disk (the failure itself, often) must neither put
    its messages back on the console nor replace the error the run stops with."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> None:
        try:
            os.write(self._fd, text.encode("utf-8", "replace"))
        except OSError:
            pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self._fd)


class _QuietHandler(logging.StreamHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass  # the stream already dropped what it could not write; never print to the console


@contextlib.contextmanager
def library_output_to_file(workdir: str, process_index: int) -> Iterator[str]:
    """Within the block, Python logging (Orbax and absl log through it), unraisable errors and
    uncaught thread exceptions go to `<workdir>/logs/process_<i>.log` (yielded); the
    handlers and hooks it replaced are put back after it."""
    path = os.path.join(os.path.abspath(workdir), "logs", f"process_{process_index}.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stream = _BestEffortLog(path)
    handler = _QuietHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))

    def unraisable(event: Any) -> None:
        stream.write(f"unraisable exception in {event.object!r}:\n")
        stream.write("".join(traceback.format_exception(event.exc_type, event.exc_value, event.exc_traceback)))

    def thread_exception(event: Any) -> None:
        name = event.thread.name if event.thread is not None else "?"
        stream.write(f"uncaught exception in thread {name}:\n")
        stream.write("".join(traceback.format_exception(event.exc_type, event.exc_value, event.exc_traceback)))

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.unraisablehook, threading.excepthook)
    for old in saved[0]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    sys.unraisablehook, threading.excepthook = unraisable, thread_exception
    _state["path"] = path
    try:
        yield path
    finally:
        root.removeHandler(handler)
        for old in saved[0]:
            root.addHandler(old)
        root.setLevel(saved[1])
        sys.unraisablehook, threading.excepthook = saved[2], saved[3]
        stream.close()


def details_hint() -> str:
    """" (library messages: PATH)" when this run routed messages to a non-empty file, else ""."""
    path = _state.get("path")
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return ""
    return f" (library messages: {path})"
