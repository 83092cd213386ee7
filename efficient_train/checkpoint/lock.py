"""One writer per directory: an advisory lock on a work or checkpoint directory.

Two trainers on one work directory would interleave their checkpoints and metrics and
both exit 0, silently losing one run. A `DirectoryLock` holds an exclusive `flock` on
`<dir>/.efficient-train.lock` and writes the holder (process id, host, what it does)
into that file, so the second process is refused with one line naming the first.

Why flock: the kernel releases it when the holding process dies, however it dies
(SIGKILL, OOM, power loss of a client), so a stale lock never needs cleaning up; the
file left behind is harmless and the next run takes it over. flock works across
processes on one machine and on Linux NFS clients (emulated with POSIX byte locks).

Locks are counted per process: a second lock on the same directory in the same
process (a test or notebook that builds two Trainers) shares the first, because the
danger guarded against is another process. Only process 0 of a multi-process run
takes the lock; callers spread its verdict to the other processes.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading

from efficient_train.errors import RunError

LOCK_FILE = ".efficient-train.lock"

_held: dict[str, list[int]] = {}  # real path of the lock file -> [fd, count]
_held_guard = threading.Lock()


class DirectoryInUse(RunError):
    """Another process holds the lock of a directory this one would write."""


class DirectoryNotWritable(RunError):
    """The directory (or its lock file) cannot be created or written."""


class DirectoryLock:
    """`with DirectoryLock(path, purpose):` or acquire()/release(); the directory is created."""

    def __init__(self, directory: str, purpose: str) -> None:
        self.directory = os.path.abspath(directory)
        self.purpose = purpose
        self._path: str | None = None

    def acquire(self) -> None:
        if self._path is not None:
            return
        path = os.path.realpath(os.path.join(self.directory, LOCK_FILE))
        with _held_guard:
            if path in _held:
                _held[path][1] += 1
                self._path = path
                return
            try:
                os.makedirs(self.directory, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise DirectoryNotWritable(
                    f"{self.directory}: cannot write its lock file {path} ({error.strerror}); {self.purpose} "
                    "must be a writable directory"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise DirectoryInUse(
                    f"{self.directory} is in use by {holder} (lock {path}); wait for that run to end, or give this "
                    "one another directory"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            _held[path] = [fd, 1]
            self._path = path

    def release(self) -> None:
        if self._path is None:
            return
        with _held_guard:
            entry = _held[self._path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._path]
                os.close(entry[0])  # closing the last descriptor releases the flock
        self._path = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"{record['purpose']} (process {record['pid']} on host {record['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"
