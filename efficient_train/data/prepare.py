"""`prepare`: raw text -> token shards, once, in parallel processes, resumable.

    prepare(inputs, output, tokenizer=..., fmt="jsonl", workers=N)

Plan: every input is read once in this process to hash it (sha256, the manifest's
source fingerprint) and to cut it into pieces of about `shard_bytes` at document
boundaries (a line of JSONL, a whole file of text, a row group of parquet); consecutive
pieces form units of at least `shard_bytes`, and each unit becomes one shard per split.
The plan is a pure function of the inputs and `shard_bytes`, never of `workers`, so the
output is the same whatever the parallelism and a rerun finds the same units.

Work: units go to `workers` spawned processes (one process: this one), each with its
own tokenizer and the library's own threading off, so N processes use N cores. A worker
writes its shard's files to temporary names, fsyncs and renames them; this process then
records the unit in `manifest.json` (written atomically). A killed prepare leaves at
worst a renamed shard that is not listed, which the rerun writes again: rerunning the
same command resumes from the committed units. A manifest made from other inputs, another
tokenizer or other options is refused, never overwritten.

Documents: `text` is one document per file; `jsonl` one per line (`field` holds the
text); `parquet` one per row of column `field`; `chat` one conversation per JSONL line
(`field`, default `messages`), rendered with the tokenizer's chat template and stored
with a loss mask (chat.py). Blank lines and empty documents are skipped (counted as
`empty`). A bad record (not UTF-8, not JSON, no such field, a wrong type) is a
DataError naming the file and line: fatal by default; with on_error="skip" it is
counted and reported (the first ones printed, all counted in the manifest), never
dropped silently. Each document goes to the validation split when a hash of its
input's sha256 and its line (row) falls below `validation_fraction`, so the split is
deterministic and stable across reruns.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import Any

import numpy as np

from efficient_train.data.chat import check_messages, render_chat
from efficient_train.data.errors import DataError, DataReadError, DataWriteError, file_kind, open_regular, stat_path
from efficient_train.data.jsonl import field_of, parse_line
from efficient_train.data.manifest import (
    FORMAT_VERSION,
    SHARD_DIR,
    SPLITS,
    fsync_directory,
    read_manifest,
    shard_path,
    write_atomic,
    write_manifest,
)
from efficient_train.data.sources import _sorted_files
from efficient_train.data.tokenizer import Tokenizer, load_tokenizer
from efficient_train.errors import RunError

FORMATS = ("text", "jsonl", "parquet", "chat")
ON_ERROR = ("fatal", "skip")
DEFAULT_SHARD_BYTES = 16 << 20
_READ_BLOCK = 16 << 20
_ENCODE_BATCH = 256  # documents per call of the batch encoder
_REPORTED_ERRORS = 5  # skipped-record messages kept per unit in the manifest


@dataclass(frozen=True)
class Piece:
    """Bytes [start, stop) of input `source` (parquet: row groups [start, stop)); `line`: the
    line (parquet: row) number of its first record, counting from 1."""

    source: int
    start: int
    stop: int
    line: int


@dataclass(frozen=True)
class Input:
    """One input file as planned: path, size and mtime (checked again by the worker), sha256."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Options:
    fmt: str
    field: str
    validation_fraction: float
    on_error: str
    token_dtype: str
    output: str
    tokenizer: str
    tokenizer_fingerprint: str
    inputs: tuple[Input, ...]


# ------------------------------------------------------------------------------ inputs


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named, matched by a glob, or under a directory (recursively, sorted); each once."""
    files: list[Path] = []
    for pattern in patterns:
        if has_magic(pattern) and not os.path.lexists(pattern):
            matches = sorted(glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"--input: '{pattern}' matches no file")
        else:
            matches = [pattern]
        for match in matches:
            mode = stat_path(match, "--input").st_mode
            if stat.S_ISDIR(mode):
                files.extend(_sorted_files(Path(match), None, frozenset()))
            elif stat.S_ISREG(mode):
                files.append(Path(match))
            elif not has_magic(pattern):
                raise DataError(f"--input: '{match}' is {file_kind(mode)}; give files, globs or directories")
    seen: set[str] = set()
    unique = []
    for f in files:
        if os.path.realpath(f) not in seen:
            seen.add(os.path.realpath(f))
            unique.append(f)
    if not unique:
        raise DataError(f"--input: {' '.join(patterns)!r} names no regular file")
    return unique


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError:
        raise DataError("--format parquet needs pyarrow, which is not installed; "
                        "pip install 'efficient-train[data]'") from None
    return pyarrow.parquet


def _scan(path: Path, fmt: str, shard_bytes: int, source: int) -> tuple[Input, list[Piece]]:
    """Hash one input and cut it into pieces of about shard_bytes at record boundaries."""
    fd = open_regular(path, "--input")
    try:
        st = os.fstat(fd)
        digest, offset, lines = hashlib.sha256(), 0, 0
        cuts = [(0, 1)]
        target = shard_bytes
        with os.fdopen(fd, "rb", closefd=False) as f:
            while block := f.read(_READ_BLOCK):
                digest.update(block)
                while fmt in ("jsonl", "chat") and target < offset + len(block):
                    newline = block.find(b"\n", target - offset)
                    if newline < 0:
                        target = offset + len(block)
                        break
                    cut = offset + newline + 1
                    cuts.append((cut, lines + block.count(b"\n", 0, newline + 1) + 1))
                    target = cut + shard_bytes
                lines += block.count(b"\n")
                offset += len(block)
    except OSError as error:
        raise DataReadError(f"--input: reading '{path}' failed: {error.strerror}") from None
    finally:
        os.close(fd)
    record = Input(str(path), offset, st.st_mtime_ns, digest.hexdigest())
    if offset == 0:
        return record, []
    if fmt == "parquet":
        return record, _parquet_pieces(path, source)
    cuts = [c for c in cuts if c[0] < offset]
    stops = [c[0] for c in cuts[1:]] + [offset]
    return record, [Piece(source, start, stop, line) for (start, line), stop in zip(cuts, stops)]


def _parquet_pieces(path: Path, source: int) -> list[Piece]:
    parquet = _pyarrow_parquet()
    try:
        metadata = parquet.ParquetFile(path).metadata
    except ValueError as error:  # pyarrow's ArrowInvalid: not parquet, or damaged
        raise DataError(f"--input: '{path}' is not a parquet file the reader accepts: {error}") from None
    except OSError as error:
        raise DataReadError(f"--input: reading '{path}' failed: {error}") from None
    pieces, row = [], 1
    for group in range(metadata.num_row_groups):
        pieces.append(Piece(source, group, group + 1, row))
        row += metadata.row_group(group).num_rows
    return pieces


def plan(files: list[Path], fmt: str, shard_bytes: int) -> tuple[list[Input], list[list[Piece]]]:
    """The inputs' fingerprints and the units: lists of consecutive pieces of >= shard_bytes."""
    inputs, units, current, size = [], [], [], 0
    for index, path in enumerate(files):
        record, pieces = _scan(path, fmt, shard_bytes, index)
        inputs.append(record)
        for piece in pieces:
            current.append(piece)
            size += record.size // max(1, len(pieces)) if fmt == "parquet" else piece.stop - piece.start
            if size >= shard_bytes:
                units.append(current)
                current, size = [], 0
    if current:
        units.append(current)
    return inputs, units


# ------------------------------------------------------------------------------ worker

_WORKER: dict[str, Any] = {}


def _init_worker(options: Options, in_process: bool) -> None:
    """Load the tokenizer once per worker; a spawned worker turns the library's threads off."""
    if not in_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(options.tokenizer, "--tokenizer")
    if tokenizer.fingerprint != options.tokenizer_fingerprint:
        raise DataError(f"--tokenizer: '{options.tokenizer}' changed while prepare ran; rerun prepare")
    _WORKER.update(options=options, tokenizer=tokenizer)


def _records(options: Options, piece: Piece) -> Iterator[tuple[int, Any]]:
    """(line, document) of one piece; the document is a str (text), a messages list (chat),
    or a DataError naming the position when the record is bad."""
    source = options.inputs[piece.source]
    where = f"'{source.path}'"
    if options.fmt == "parquet":
        yield from _parquet_records(options, piece, source)
        return
    fd = open_regular(source.path, "--input")
    try:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (source.size, source.mtime_ns):
            raise DataError(f"--input: {where} changed while prepare ran; rerun prepare to start over on the "
                            "new content (or restore the file to resume)")
        data = _pread(fd, piece.start, piece.stop - piece.start, source.path)
    finally:
        os.close(fd)
    if options.fmt == "text":
        try:
            yield piece.line, data.decode("utf-8")
        except UnicodeDecodeError as error:
            line_number = data.count(b"\n", 0, error.start) + 1
            yield line_number, DataError(f"{where} line {line_number}: not UTF-8 (byte 0x{data[error.start]:02x}); text "
                                  "inputs are UTF-8")
        return
    for number, line in enumerate(data.split(b"\n"), start=piece.line):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        try:
            yield number, _jsonl_value(line, options)
        except DataError as error:
            yield number, DataError(f"{where} line {number}: {error}")


def _jsonl_value(line: bytes, options: Options) -> Any:
    record = parse_line(line)
    if options.fmt == "chat":
        return check_messages(record, options.field)
    value = field_of(record, options.field)
    if not isinstance(value, str):
        raise DataError(f"field '{options.field}' is of type {type(value).__name__}; it must be a string of text")
    return value


def _parquet_records(options: Options, piece: Piece, source: Input) -> Iterator[tuple[int, Any]]:
    parquet = _pyarrow_parquet()
    where = f"'{source.path}'"
    st = stat_path(source.path, "--input")
    if (st.st_size, st.st_mtime_ns) != (source.size, source.mtime_ns):
        raise DataError(f"--input: {where} changed while prepare ran; rerun prepare")
    try:
        table = parquet.ParquetFile(source.path).read_row_groups(list(range(piece.start, piece.stop)))
    except ValueError as error:
        raise DataError(f"--input: {where} row groups {piece.start}-{piece.stop - 1} cannot be decoded: "
                        f"{error}") from None
    except OSError as error:
        raise DataReadError(f"--input: reading {where} failed: {error}") from None
    if options.field not in table.column_names:
        raise DataError(f"{where}: no column '{options.field}'; columns: {', '.join(table.column_names)}")
    for row, value in enumerate(table.column(options.field).to_pylist(), start=piece.line):
        if isinstance(value, str):
            yield row, value
        else:
            yield row, DataError(f"{where} row {row}: column '{options.field}' is "
                                 f"{'null' if value is None else 'of type ' + type(value).__name__}; it must be a string")


def _pread(fd: int, start: int, count: int, path: str) -> bytes:
    chunks, done = [], 0
    try:
        while done < count:
            chunk = os.pread(fd, count - done, start + done)
            if not chunk:
                raise DataError(f"--input: '{path}' shrank while prepare ran; rerun prepare")
            chunks.append(chunk)
            done += len(chunk)
    except OSError as error:
        raise DataReadError(f"--input: reading '{path}' failed: {error.strerror}") from None
    return b"".join(chunks)


def _in_validation(sha256: str, line: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    key = hashlib.blake2b(f"{sha256}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") < fraction * 2**64


def prepare_unit(unit: int, pieces: list[Piece]) -> dict[str, Any]:
    """Tokenize one unit and commit its shard files (not yet the manifest); its counts."""
    options: Options = _WORKER["options"]
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    out: dict[str, dict[str, list[np.ndarray]]] = {split: {"ids": [], "mask": []} for split in SPLITS}
    pending: list[tuple[str, str]] = []
    stats: dict[str, Any] = {"skipped": 0, "empty": 0, "errors": []}

    def add(split: str, ids: np.ndarray, mask: np.ndarray | None) -> None:
        if not len(ids):
            stats["empty"] += 1
            return
        out[split]["ids"].append(ids)
        if mask is not None:
            out[split]["mask"].append(mask)

    def flush() -> None:
        for (split, _), ids in zip(pending, tokenizer.encode_documents([text for _, text in pending])):
            add(split, ids, None)
        pending.clear()

    for piece in pieces:
        sha = options.inputs[piece.source].sha256
        for line, document in _records(options, piece):
            if options.fmt == "chat" and not isinstance(document, DataError):
                try:
                    ids, mask = render_chat(tokenizer, document)
                except DataError as error:
                    document = DataError(f"'{options.inputs[piece.source].path}' line {line}: {error}")
            if isinstance(document, DataError):
                if options.on_error == "fatal":
                    raise DataError(f"{document}; fix the record, or pass --on_error skip to count and skip it")
                stats["skipped"] += 1
                if len(stats["errors"]) < _REPORTED_ERRORS:
                    stats["errors"].append(str(document))
                continue
            split = SPLITS[1] if _in_validation(sha, line, options.validation_fraction) else SPLITS[0]
            if options.fmt == "chat":
                add(split, ids, mask)
            else:
                pending.append((split, document))
                if len(pending) >= _ENCODE_BATCH:
                    flush()
    flush()
    try:
        for split in SPLITS:
            stats[split] = _write_split(options, unit, split, out[split]["ids"], out[split]["mask"])
        fsync_directory(Path(options.output) / SHARD_DIR)
    except OSError as error:
        raise DataWriteError(f"--output: writing shard {unit} in '{options.output}' failed: "
                             f"{error.strerror or error}") from None
    return stats


def _write_split(options: Options, unit: int, split: str, ids: list[np.ndarray],
                 masks: list[np.ndarray]) -> dict[str, int]:
    if not ids:
        return {"documents": 0, "tokens": 0}
    lengths = np.array([len(d) for d in ids], dtype=np.int64)
    tokens = np.concatenate(ids).astype(options.token_dtype)
    write_atomic(shard_path(options.output, unit, split, "tokens"), tokens.data)
    write_atomic(shard_path(options.output, unit, split, "docs"), np.concatenate([[0], np.cumsum(lengths)]).data)
    if options.fmt == "chat":
        write_atomic(shard_path(options.output, unit, split, "mask"), np.concatenate(masks).astype(np.uint8).data)
    return {"documents": len(ids), "tokens": int(lengths.sum())}


# ------------------------------------------------------------------------------ driver


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _identity(options: Options, tokenizer: Tokenizer, shard_bytes: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "format": options.fmt,
        "field": options.field,
        "validation_fraction": options.validation_fraction,
        "shard_bytes": shard_bytes,
        "token_dtype": options.token_dtype,
        "inputs": [{"bytes": i.size, "sha256": i.sha256} for i in options.inputs],
    }


def _open_output(output: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue: an existing one of the same identity, or a new one."""
    if output.exists() and not output.is_dir():
        raise DataError(f"--output: '{output}' exists and is not a directory")
    manifest = read_manifest(output, "--output") if output.exists() else None
    if manifest is None:
        if output.exists() and any(output.iterdir()):
            raise DataError(f"--output: '{output}' is not empty and holds no manifest.json; give a new or empty "
                            "directory (nothing in this one is touched)")
        manifest = {"identity": identity, "complete": False, "shards": {}}
        try:
            (output / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            write_manifest(output, manifest)
        except OSError as error:
            raise DataWriteError(f"--output: cannot create '{output}': {error.strerror}") from None
        return manifest
    old = manifest["identity"]
    differ = [key for key in identity if old.get(key) != identity[key]]
    if differ:
        raise DataError(f"--output: '{output}' was prepared from other {', '.join(differ)}; give a new --output "
                        "directory (this one is kept as it is)")
    return manifest


def prepare(
    inputs: list[str],
    output: str | os.PathLike,
    *,
    tokenizer: str = "",
    fmt: str = "text",
    field: str | None = None,
    validation_fraction: float = 0.0,
    workers: int | None = None,
    on_error: str = "fatal",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare (or resume preparing) `output` from `inputs`; returns the complete manifest.

    workers: processes (default: the cores this process may run on; one runs in this process).
    """
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if fmt not in FORMATS:
        raise DataError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise DataError(f"--on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"--validation_fraction: {validation_fraction} must lie in [0, 1)")
    if workers < 1:
        raise DataError(f"--workers: {workers} must be >= 1")
    if shard_bytes < 1:
        raise DataError(f"--shard_bytes: {shard_bytes} must be >= 1")
    field = field or ("messages" if fmt == "chat" else "text")
    if fmt == "parquet":
        _pyarrow_parquet()
    loaded = load_tokenizer(tokenizer, "--tokenizer")
    if fmt == "chat" and loaded.chat_template is None:
        raise DataError(f"--format chat: the tokenizer {loaded.where} has no chat_template "
                        "(tokenizer_config.json 'chat_template' or chat_template.jinja)")
    files = expand_inputs(inputs)
    records, units = plan(files, fmt, shard_bytes)
    output = Path(output)
    options = Options(fmt, field, float(validation_fraction), on_error, token_dtype(loaded.vocab_size), str(output),
                      os.fspath(tokenizer), loaded.fingerprint, tuple(records))
    manifest = _open_output(output, _identity(options, loaded, shard_bytes))
    todo = [u for u in range(len(units)) if str(u) not in manifest["shards"]]
    if todo:
        _run(options, units, todo, manifest, workers, progress)
    if not manifest["complete"]:
        manifest["complete"] = True
        manifest["totals"] = _totals(manifest)
        write_manifest(output, manifest)
    return manifest


def _totals(manifest: dict[str, Any]) -> dict[str, Any]:
    shards = manifest["shards"].values()
    totals: dict[str, Any] = {split: {key: sum(s[split][key] for s in shards) for key in ("documents", "tokens")}
                              for split in SPLITS}
    totals.update(skipped=sum(s["skipped"] for s in shards), empty=sum(s["empty"] for s in shards))
    return totals


def _run(options: Options, units: list[list[Piece]], todo: list[int], manifest: dict[str, Any], workers: int,
         progress: bool) -> None:
    from tqdm import tqdm

    sizes = {u: sum(options.inputs[p.source].size if options.fmt == "parquet" else p.stop - p.start
                    for p in units[u]) for u in todo}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="prepare", disable=not progress,
               dynamic_ncols=True)
    start, tokens, shown = time.perf_counter(), 0, 0

    def commit(unit: int, stats: dict[str, Any]) -> None:
        nonlocal tokens, shown
        manifest["shards"][str(unit)] = stats
        write_manifest(options.output, manifest)
        tokens += sum(stats[split]["tokens"] for split in SPLITS)
        for message in stats["errors"][: max(0, 10 - shown)]:
            bar.write(f"warning: skipped {message}", file=sys.stderr)
        shown += len(stats["errors"])
        bar.update(sizes[unit])
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)

    workers = min(workers, len(todo))  # a process per unit at most: a small input is tokenized here
    try:
        if workers == 1:
            _init_worker(options, in_process=True)
            for unit in todo:
                commit(unit, prepare_unit(unit, units[unit]))
            return
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold jax or threads
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(options, False)) as pool:
            futures: dict[Future, int] = {pool.submit(prepare_unit, u, units[u]): u for u in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                for future in done:
                    if future.exception() is None:
                        commit(futures[future], future.result())
                if failed:
                    for future in pending:
                        future.cancel()
                    error = failed[0].exception()
                    assert error is not None  # failed: it raised
                    raise error
    except BrokenProcessPool:
        raise RunError(f"--workers: a prepare worker process died (out of memory, or killed); the "
                             f"{len(manifest['shards'])} committed shards in '{options.output}' are kept; "
                             "rerun the same command to resume") from None
    finally:
        bar.close()
