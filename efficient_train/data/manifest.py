"""A prepared dataset's directory: its file names and `manifest.json`, read and written safely.

    DIR/manifest.json                     what was prepared from what (see below)
    DIR/shards/<unit>.<split>.tokens      token ids, uint16 or uint32, documents back to back
    DIR/shards/<unit>.<split>.docs        int64 document offsets into .tokens (documents + 1 values)
    DIR/shards/<unit>.<split>.mask        uint8 loss mask per token (chat datasets only)

The manifest's `identity` (format version, tokenizer fingerprint and vocabulary, input
format and field, validation fraction, shard size, token dtype, and every input's size
and sha256) says what the directory is prepared from; `shards` lists the committed units
with their document and token counts per split (and, except for chat, the UTF-8 bytes
of the documents' text, which evaluation's bits per byte divides by); `complete` is true once every unit is
committed. A shard file is listed only after it was written to a temporary name,
fsynced and renamed, so a listed shard is whole; files not listed are ignored. The
manifest itself is replaced atomically (temporary file, fsync, rename, directory fsync).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from efficient_train.data.errors import DataError, DataReadError, read_regular

MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")


def shard_path(directory: str | os.PathLike, unit: int, split: str, kind: str) -> Path:
    """The file of `kind` (tokens, docs, mask) of one unit's split."""
    return Path(directory) / SHARD_DIR / f"{unit:06d}.{split}.{kind}"


def fsync_directory(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """`data` at `path`, whole or not at all: a temporary file, fsynced, renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    write_atomic(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    fsync_directory(directory)


def read_manifest(directory: str | os.PathLike, what: str) -> dict[str, Any] | None:
    """The manifest of a prepared directory, None when the directory has none; DataError when unusable."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    raw = read_regular(path, what)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{what}: '{path}' is not JSON ({' '.join(str(error).split())[:120]}); it is not a "
                        "manifest efficient-train wrote") from None
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("identity"), dict)
          and isinstance(manifest.get("shards"), dict) and isinstance(manifest.get("complete"), bool))
    if not ok:
        raise DataError(f"{what}: '{path}' lacks identity, shards or complete; it is not a manifest "
                        "efficient-train prepare wrote")
    version = manifest["identity"].get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{what}: '{path}' has format_version {version!r}; this efficient-train reads "
                        f"{FORMAT_VERSION}; prepare the data again with this version")
    return manifest


def check_shard_size(path: Path, expected: int, what: str) -> None:
    """Check that a shard file holds exactly `expected` bytes (a listed shard is whole)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise DataError(f"{what}: shard '{path}' is listed in the manifest but missing; prepare the "
                        "directory again") from None
    except OSError as error:
        raise DataReadError(f"{what}: shard '{path}' cannot be read: {error.strerror}") from None
    if size != expected:
        raise DataError(f"{what}: shard '{path}' holds {size} bytes, the manifest says {expected}; it was "
                        "changed after prepare; prepare the directory again")
