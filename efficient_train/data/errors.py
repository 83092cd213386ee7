"""DataError, and the checked ways the data package meets files.

A data problem is a `DataError`, an `InputError` (the CLI prints one line, exit status
2) whose message names the file and the position in it: the line of a JSONL file, the
token offset of a token file, the path of a directory entry. An operating-system
failure to read (EIO) is a `DataReadError`, a `RunError` (exit status 1): the data may
be fine; failing to write prepared shards is a `DataWriteError` (also exit 1).

Files are met only through `stat_regular` / `open_regular`: `os.stat` first, and a
path that is not a regular file (a FIFO, a socket, a device) is refused without being
opened, since opening a FIFO for reading blocks until a writer appears. The open
itself is non-blocking and re-checks the opened descriptor, so a file swapped for a
FIFO between the two calls cannot hang the run either.
"""
from __future__ import annotations

import os
import stat

from efficient_train.errors import InputError, RunError


class DataError(InputError):
    """A data file or directory is unusable; one line naming the file and the position in it."""


class DataReadError(RunError):
    """Reading data failed in the operating system (an I/O error), not because of its content; exit 1."""


class DataWriteError(RunError):
    """Writing prepared data failed in the operating system (a full disk, EIO); exit 1."""


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a directory', ... for an os.stat st_mode."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def stat_path(path: str | os.PathLike, what: str) -> os.stat_result:
    """os.stat(path) (following symlinks), or DataError naming `what` and the path."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{what}: '{os.fspath(path)}' does not exist") from None
    except ValueError:  # an embedded NUL byte
        raise DataError(f"{what}: {os.fspath(path)!r} is not a usable path (it contains a NUL byte)") from None
    except OSError as error:  # a symlink loop (ELOOP), a permission, a name too long
        raise DataError(f"{what}: '{os.fspath(path)}' cannot be read: {error.strerror}") from None


def stat_regular(path: str | os.PathLike, what: str) -> os.stat_result:
    """os.stat of a regular file, or DataError saying what the path is instead."""
    st = stat_path(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what}: '{os.fspath(path)}' is {file_kind(st.st_mode)}; a regular file is needed")
    return st


def open_regular(path: str | os.PathLike, what: str) -> int:
    """A read-only file descriptor of a regular file (refused unopened when it is not one)."""
    stat_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise DataError(f"{what}: '{os.fspath(path)}' cannot be opened: {error.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise DataError(f"{what}: '{os.fspath(path)}' is {file_kind(st.st_mode)}; a regular file is needed")
    return fd


def read_regular(path: str | os.PathLike, what: str, limit: int | None = None) -> bytes:
    """The first `limit` bytes (all when None) of a regular file."""
    fd = open_regular(path, what)
    try:
        with os.fdopen(fd, "rb", closefd=True) as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as error:  # EIO and the like: the system failed, the data may be fine
        raise DataReadError(f"{what}: reading '{os.fspath(path)}' failed: {error.strerror}") from None
