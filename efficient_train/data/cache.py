"""The token cache of a raw-text source trained with a tokenizer (`data.tokenizer` on `text` or `jsonl`).

The first run prepares the source's files (prepare.py) into
`<cache_dir>/<key>/`; later runs reuse it. The key hashes the tokenizer's fingerprint,
the format and field, and each file's path, size and mtime, so an edited file or
another tokenizer routes to a fresh directory (old ones are kept; delete
`<workdir>/data_cache` to reclaim them). Whether a directory is still valid is the
manifest's decision: `prepare` re-hashes every file and refuses a manifest made from
other content, and resumes a cache whose preparation was interrupted. Processes that
share the cache directory prepare it one at a time (an flock on `<cache_dir>/.lock`), so
the second finds it complete.

A `text` source's files are the ones the byte-level source reads (data.path, or the
standard library's sources for ""), whole, taken in order until `max_bytes` is reached.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from efficient_train.data.errors import DataWriteError, stat_path
from efficient_train.data.prepare import prepare
from efficient_train.data.prepared import PreparedSource
from efficient_train.data.sources import text_files
from efficient_train.data.tokenizer import Tokenizer


def _files(source: str, path: str, max_bytes: int) -> list[Path]:
    if source == "jsonl":
        return [Path(path)]
    files, total = [], 0
    for file in text_files(path):
        size = stat_path(file, "data.path").st_size
        if size:
            files.append(file)
            total += size
        if total >= max_bytes:
            break
    return files


def cached_source(source: str, path: str, field: str, max_bytes: int, tokenizer: Tokenizer, tokenizer_path: str,
                  cache_dir: str, vocab_size: int) -> PreparedSource:
    """The prepared train split of a text or jsonl source, prepared here on first use."""
    files = _files(source, path, max_bytes)
    fmt = "text" if source == "text" else "jsonl"
    stats = [(os.path.realpath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([tokenizer.fingerprint, fmt, field, stats]).encode()).hexdigest()[:16]
    directory = Path(cache_dir) / f"{fmt}-{key}"
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = os.open(os.path.join(cache_dir, ".lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        raise DataWriteError(f"data.tokenizer: cannot create the token cache '{cache_dir}': {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepare([str(f) for f in files], directory, tokenizer=tokenizer_path, fmt=fmt, field=field, progress=True)
    finally:
        os.close(lock)
    return PreparedSource(directory, vocab_size=vocab_size)
