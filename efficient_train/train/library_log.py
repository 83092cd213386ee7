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

import logging
import os
import sys
import threading
import traceback
from typing import Any, TextIO

_state: dict[str, Any] = {}


def route_library_output(workdir: str, process_index: int) -> str:
    """Send Python logging (Orbax and absl log through it), unraisable errors and uncaught
    thread exceptions to `<workdir>/logs/process_<i>.log`; returns that path."""
    path = os.path.join(os.path.abspath(workdir), "logs", f"process_{process_index}.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stream: TextIO = open(path, "a", encoding="utf-8", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("absl").propagate = True

    def unraisable(event: Any) -> None:
        stream.write(f"unraisable exception in {event.object!r}:\n")
        stream.write("".join(traceback.format_exception(event.exc_type, event.exc_value, event.exc_traceback)))

    def thread_exception(event: Any) -> None:
        name = event.thread.name if event.thread is not None else "?"
        stream.write(f"uncaught exception in thread {name}:\n")
        stream.write("".join(traceback.format_exception(event.exc_type, event.exc_value, event.exc_traceback)))

    sys.unraisablehook = unraisable
    threading.excepthook = thread_exception
    _state["path"] = path
    return path


def details_hint() -> str:
    """" (library messages: PATH)" when this run routed messages to a non-empty file, else ""."""
    path = _state.get("path")
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return ""
    return f" (library messages: {path})"
