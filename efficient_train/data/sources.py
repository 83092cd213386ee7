"""Token sources: documents as int arrays, by index, with a stable fingerprint.

A source owns where tokens come from and nothing else: packing, shuffling and sharding
live in `packing.py` and `loader.py`. Every source has the same small interface so the
loader can treat them alike:

- `document_lengths()` gives all lengths up front (the packer's offset table needs them,
  and they are cheap for every source here), `len(source)` the number of documents;
- `read(doc, start, stop)` gives tokens [start, stop) of one document as int32 without
  touching the rest of it (a memory-mapped document may be gigabytes long), and checks
  that each id it returns lies in [0, vocab_size); `source[doc]` is the whole document;
- `fingerprint()` is a short string that changes when the data changes but not when the
  files move, so a checkpoint can tell whether it resumes the same data;
- `read_mask(doc, start, stop)` says which tokens are training targets (a chat dataset's
  assistant tokens; every token elsewhere), when `has_loss_mask` is set.

Documents are never empty: empty files, lines and lists are skipped.
Ids are checked where they are read (every slice, so a bad id found mid-run names its
file and token offset), and also up front where that is cheap: sources that hold
everything in memory (text, JSONL) check while loading, and a token file is scanned
once at start-up when it is at most `TokenFileSource.EAGER_CHECK_BYTES` (1 GiB: measured
0.1 s per 256 MiB from the page cache, seconds from a cold disk) or when finding eos
tokens scans it anyway; a larger file is checked per read only, which a file of
hundreds of gigabytes needs.

Every problem with the data is a `DataError` (an InputError: one line, exit status 2)
naming the file and the position: the line of a JSONL file, the token offset of a token
file, the path of a directory entry. Files are opened only after `os.stat` says they
are regular (a FIFO would block the open); a directory walk skips, with a warning,
entries it cannot use (special files, broken links) and directories it has already
read (a symlink cycle), so it always ends.

Token files are read with `os.preadv` into fresh arrays rather than memory-mapped: a
mapped file that another process truncates kills the reader with SIGBUS at the first
touch of a vanished page, which no Python code can catch, whereas a short read is an
ordinary condition, reported as a DataError naming the file and the offset. It costs
nothing measurable: the loader's batch of 16 rows of 2048 tokens from a 256 MiB uint16
file took 1.3-1.4 ms with preadv against 1.4-1.5 ms memory-mapped (2 CPU cores, page
cache warm; packing dominates both).
"""
from __future__ import annotations

import abc
import hashlib
import os
import stat
import sysconfig
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from efficient_train.data.errors import DataError, DataReadError, file_kind, open_regular, read_regular, stat_path
from efficient_train.data.jsonl import field_of, parse_line

PathLike = str | os.PathLike
DEFAULT_TEXT_MAX_BYTES = 4 << 20
# The allowed data.token_dtype names; config.py and check_data_config check against this tuple.
TOKEN_DTYPES = ("uint16", "uint32")
_INT32_LIMIT = 2**31


class TokenSource(abc.ABC):
    """Random-access documents of token ids. Subclasses set `_lengths` and `vocab_size`."""

    _lengths: np.ndarray
    vocab_size: int | None
    # True when some tokens are never targets (chat: prompts); read_mask then says which.
    has_loss_mask = False

    def document_lengths(self) -> np.ndarray:
        """int64 length of every document, in document order."""
        return self._lengths

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(index)

    def read(self, index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int32 tokens [start, stop) of document `index` (stop=None: to its end)."""
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: document {index} out of range [0, {len(self)})")
        length = int(self._lengths[index])
        stop = length if stop is None else stop
        if not 0 <= start <= stop <= length:
            raise IndexError(
                f"{type(self).__name__}: slice [{start}, {stop}) outside document {index} of length {length}"
            )
        raw = np.asarray(self._slice(index, start, stop))
        limit = _INT32_LIMIT if self.vocab_size is None else self.vocab_size
        if raw.size and (raw.min() < 0 or raw.max() >= limit):
            at = int(np.flatnonzero((raw < 0) | (raw >= limit))[0])
            raise DataError(f"{self._position(index, start + at)}: token id {int(raw[at])} is outside "
                            f"[0, {limit}); {_id_rule(self.vocab_size)}")
        return raw.astype(np.int32)

    def read_mask(self, index: int, start: int, stop: int) -> np.ndarray:
        """float32 loss mask of tokens [start, stop) of document `index`: 1 where the token is
        a training target (all of them unless `has_loss_mask`)."""
        return np.ones(stop - start, dtype=np.float32)

    def _position(self, index: int, offset: int) -> str:
        """Where token `offset` of document `index` lives, for error messages."""
        return f"{type(self).__name__} {self._describe()} document {index} token {offset}"

    @abc.abstractmethod
    def _slice(self, index: int, start: int, stop: int) -> np.ndarray:
        """Raw tokens [start, stop) of a document (bounds already checked)."""

    @abc.abstractmethod
    def _describe(self) -> str:
        """Where the data comes from, for error messages."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable identity of the data (not of its location)."""


def _id_rule(vocab_size: int | None) -> str:
    return "ids must be below model.vocab_size" if vocab_size is not None else "ids must fit int32"


class _BufferSource(TokenSource):
    """Documents stored back to back in one in-memory array, with an offset table."""

    def __init__(self, docs: list[np.ndarray], dtype: type, vocab_size: int | None) -> None:
        self._lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])
        self._tokens: np.ndarray = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
        self.vocab_size = vocab_size

    def _slice(self, index: int, start: int, stop: int) -> np.ndarray:
        base = int(self._offsets[index])
        return self._tokens[base + start : base + stop]

    def _content_hash(self) -> str:
        digest = hashlib.sha256(self._lengths.tobytes())
        digest.update(self._tokens.tobytes())
        return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- synthetic


class SyntheticSource(TokenSource):
    """Documents drawn from a seeded sparse first-order Markov chain over the vocab.

    Each token v has `successors` distinct successor tokens with Dirichlet(1) weights;
    one of them is the next token on a seeded cycle through the whole vocab, which makes
    the chain irreducible, so its stationary distribution pi is unique. Documents start
    from pi, so every transition in every document is a draw from the stationary chain
    and the best achievable next-token loss is exactly the entropy rate

        best_loss = sum_v pi[v] * H(probs[v])   (nats/token).

    (A document's first token is never a training target: packing gives it weight 0.)
    Document lengths are uniform in [ceil(doc_len / 2), doc_len], so packed rows contain
    document boundaries. Document i is generated on demand from the seed and i alone.
    """

    vocab_size: int  # always known: the chain is over it

    def __init__(
        self,
        vocab_size: int,
        seed: int,
        *,
        num_documents: int = 65536,
        doc_len: int = 256,
        successors: int = 3,
    ) -> None:
        if not 2 <= successors <= vocab_size:
            raise DataError(
                f"SyntheticSource successors: {successors} must lie in [2, vocab_size={vocab_size}]"
            )
        if num_documents < 1 or doc_len < 2:
            raise DataError(
                f"SyntheticSource num_documents/doc_len: got {num_documents}/{doc_len}; need >= 1 / >= 2"
            )
        if seed < 0:
            raise DataError(f"SyntheticSource seed: {seed} must be >= 0")
        self.vocab_size = vocab_size
        self.seed = seed
        self.doc_len = doc_len
        self._config = (vocab_size, seed, num_documents, doc_len, successors)

        rng = np.random.default_rng([seed, 0])
        cycle = rng.permutation(vocab_size)
        next_on_cycle = np.empty(vocab_size, np.int64)
        next_on_cycle[cycle] = np.roll(cycle, -1)
        # k = successors-1 more distinct tokens per row, none equal to the cycle successor:
        # sorted draws from [0, V-k] plus 0..k-1 are distinct in [0, V-1); then values at or
        # above next_on_cycle move up by one, skipping it.
        k = successors - 1
        others = np.sort(rng.integers(0, vocab_size - k, size=(vocab_size, k)), axis=1) + np.arange(k)
        others += others >= next_on_cycle[:, None]
        self.successors = np.concatenate([next_on_cycle[:, None], others], axis=1)
        self.probs = rng.dirichlet(np.ones(successors), size=vocab_size)
        self.stationary = self._stationary_distribution()

        entropies = -np.sum(self.probs * np.log(self.probs), axis=1)
        self.best_loss = float(self.stationary @ entropies)

        low = (doc_len + 1) // 2
        lengths_rng = np.random.default_rng([seed, 1])
        self._lengths = lengths_rng.integers(low, doc_len + 1, size=num_documents).astype(np.int64)
        self._start_cdf = np.cumsum(self.stationary)
        self._cdf_rows = np.cumsum(self.probs, axis=1).tolist()
        self._succ_rows = self.successors.tolist()

    def _stationary_distribution(self) -> np.ndarray:
        """pi = pi P by lazy power iteration (the lazy chain (I + P)/2 is aperiodic)."""
        vocab = self.vocab_size
        pi = np.full(vocab, 1.0 / vocab)
        flat_succ = self.successors.ravel()
        for _ in range(10_000):  # converges in ~200 iterations for vocabularies up to 150k
            moved = np.bincount(flat_succ, weights=(pi[:, None] * self.probs).ravel(), minlength=vocab)
            new = 0.5 * (pi + moved)
            new /= new.sum()
            if np.abs(new - pi).sum() < 1e-14:
                return new
            pi = new
        raise RuntimeError("SyntheticSource: stationary distribution did not converge")

    def _slice(self, index: int, start: int, stop: int) -> np.ndarray:
        length = int(self._lengths[index])
        rng = np.random.default_rng([self.seed, 2, index])
        draws = rng.random(length)
        token = int(np.searchsorted(self._start_cdf, draws[0] * self._start_cdf[-1], side="right"))
        token = min(token, self.vocab_size - 1)
        out = [token]
        cdf_rows, succ_rows = self._cdf_rows, self._succ_rows
        for u in draws[1:stop].tolist():
            cdf = cdf_rows[token]
            j = 0
            while j < len(cdf) - 1 and u * cdf[-1] >= cdf[j]:
                j += 1
            token = succ_rows[token][j]
            out.append(token)
        return np.array(out[start:stop], dtype=np.int64)

    def _describe(self) -> str:
        return f"(seed {self.seed})"

    def fingerprint(self) -> str:
        vocab, seed, num_documents, doc_len, successors = self._config
        return (
            f"synthetic-v1:vocab={vocab},seed={seed},documents={num_documents},"
            f"doc_len={doc_len},successors={successors}"
        )


# --------------------------------------------------------------------------- text


def _sorted_files(root: Path, suffix: str | None, skip_dirs: frozenset[str]) -> Iterator[Path]:
    """Regular files under root, depth first, entries sorted by name; hidden ones skipped.

    Symlinks are followed, but a directory already entered (same device and inode) is
    skipped with a warning, so a symlink cycle ends; special files (FIFOs, sockets,
    devices) and entries that cannot be stat'ed (broken links, link loops) are skipped
    with a warning too. An explicit stack, not recursion: any depth works.
    """
    root_stat = stat_path(root, "data.path")
    seen = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [_listing(root)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        wanted = suffix is None or entry.name.endswith(suffix)
        try:
            st = entry.stat()  # follows a symlink
        except OSError as error:
            if wanted:
                warnings.warn(f"data.path: skipping '{entry.path}': {error.strerror}", stacklevel=2)
            continue
        if stat.S_ISDIR(st.st_mode):
            if entry.name in skip_dirs:
                continue
            if (st.st_dev, st.st_ino) in seen:
                warnings.warn(f"data.path: skipping '{entry.path}': a directory already read "
                              "(a symlink cycle or a second link to it)", stacklevel=2)
                continue
            seen.add((st.st_dev, st.st_ino))
            stack.append(_listing(Path(entry.path)))
        elif stat.S_ISREG(st.st_mode):
            if wanted:
                yield Path(entry.path)
        elif wanted:
            warnings.warn(f"data.path: skipping '{entry.path}': not a regular file", stacklevel=2)


def _listing(directory: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return iter(sorted(entries, key=lambda e: e.name))
    except OSError as error:
        raise DataError(f"data.path: directory '{directory}' cannot be listed: {error.strerror}") from None


def text_roots(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files and directories a text source reads ("": the standard library), each checked by os.stat."""
    if isinstance(paths, (str, os.PathLike)) and str(paths) == "":
        return [Path(sysconfig.get_paths()["stdlib"])]
    roots = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for root in roots:
        mode = stat_path(root, "data.path").st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise DataError(f"data.path: '{root}' is {file_kind(mode)}; give a regular file or a directory")
    return roots


def text_files(paths: PathLike | Sequence[PathLike]) -> Iterator[Path]:
    """The files of a text source in reading order: directories recursively, sorted; "" is the
    standard library's `*.py` sources (site-packages excluded)."""
    stdlib = isinstance(paths, (str, os.PathLike)) and str(paths) == ""
    suffix = ".py" if stdlib else None
    skip = frozenset({"site-packages", "dist-packages", "__pycache__"}) if stdlib else frozenset()
    for root in text_roots(paths):
        if root.is_dir():
            yield from _sorted_files(root, suffix, skip)
        else:
            yield root


class TextSource(_BufferSource):
    """Byte-level tokens (vocab 256), one document per file, at most `max_bytes` in all.

    `paths` is a file, a directory or a list of them; a directory contributes its files
    recursively in sorted order. The default ("") reads the running Python's standard
    library sources (`*.py`, site-packages excluded), present on every machine, so a
    default run needs no download. Reading stops once `max_bytes` bytes are collected
    (the last file is cut short), which keeps start-up fast and the data deterministic.
    """

    def __init__(
        self, paths: PathLike | Sequence[PathLike] = "", *, max_bytes: int = DEFAULT_TEXT_MAX_BYTES
    ) -> None:
        if max_bytes < 1:
            raise DataError(f"data.max_bytes: {max_bytes} must be >= 1")
        roots = text_roots(paths)
        self.files: list[Path] = []
        docs: list[np.ndarray] = []
        remaining = max_bytes
        for path in text_files(paths):
            data = read_regular(path, "data.path", remaining)
            if data:
                self.files.append(path)
                docs.append(np.frombuffer(data, dtype=np.uint8))
                remaining -= len(data)
            if remaining == 0:
                break
        if not docs:
            raise DataError(f"data.path: no non-empty files under {', '.join(repr(str(r)) for r in roots)}")
        self._where = str(roots[0]) if len(roots) == 1 else f"{len(roots)} paths"
        super().__init__(docs, np.uint8, 256)

    def _describe(self) -> str:
        return f"'{self._where}'"

    def _position(self, index: int, offset: int) -> str:
        return f"data.path '{self.files[index]}' byte {offset}"

    def fingerprint(self) -> str:
        return f"text-v1:{self._content_hash()}"


# --------------------------------------------------------------------------- token file


class TokenFileSource(TokenSource):
    """A flat file of uint16/uint32 token ids, read as one long stream with os.preadv.

    The stream is cut into documents of `doc_len` tokens (the last one shorter) or, when
    `eos_id` is given, after every eos token (the eos ends its document; trailing tokens
    form a last document). Finding eos tokens scans the file once, in chunks, and that
    scan (or, without eos, a scan of a file of at most EAGER_CHECK_BYTES) also checks
    every id against vocab_size, so a bad id fails the start naming its token offset.
    The fingerprint hashes the size and the first and last MiB, not the whole file.

    The file stays open; its size at start-up is the stream's length. A read that
    finds the file shorter (truncated by another process while this one runs) raises a
    DataError naming the file and the token offset; a file that grows is read to its
    original length only.
    """

    _SCAN_CHUNK = 1 << 26
    _HASH_BYTES = 1 << 20
    EAGER_CHECK_BYTES = 1 << 30

    def __init__(
        self,
        path: PathLike,
        dtype: str = "uint16",
        *,
        doc_len: int = 2048,
        eos_id: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        path = Path(path)
        if dtype not in TOKEN_DTYPES:
            raise DataError(f"data.token_dtype: '{dtype}' is not allowed; use one of {', '.join(TOKEN_DTYPES)}")
        if doc_len < 1:
            raise DataError(f"data.seq_len: document length {doc_len} must be >= 1")
        if eos_id is not None and not 0 <= eos_id <= np.iinfo(dtype).max:
            raise DataError(f"data.eos_id: {eos_id} is outside [0, {np.iinfo(dtype).max}] ({dtype})")
        self._fd = open_regular(path, "data.path")
        self._closer = weakref.finalize(self, os.close, self._fd)
        itemsize = np.dtype(dtype).itemsize
        size = os.fstat(self._fd).st_size
        if size == 0:
            raise DataError(f"data.path: '{path}' is empty; it must hold at least one token")
        if size % itemsize:
            raise DataError(f"data.path: '{path}' has {size} bytes, not a multiple of {itemsize} ({dtype}); "
                            "check data.token_dtype")
        self.path = path
        self.dtype = dtype
        self.vocab_size = vocab_size
        self._itemsize = itemsize
        self._size = size
        n = self.num_tokens = size // itemsize
        limit = _INT32_LIMIT if vocab_size is None else vocab_size
        ends: list[np.ndarray] = []
        if eos_id is not None or size <= self.EAGER_CHECK_BYTES:
            for first in range(0, n, self._SCAN_CHUNK):
                chunk = self._read_tokens(first, min(self._SCAN_CHUNK, n - first))
                if chunk.max() >= limit:
                    at = int(np.flatnonzero(chunk >= limit)[0])
                    raise DataError(f"{self._offset_text(first + at)}: token id {int(chunk[at])} is outside "
                                    f"[0, {limit}); {_id_rule(vocab_size)}")
                if eos_id is not None:
                    ends.append(np.flatnonzero(chunk == eos_id) + first + 1)
        if eos_id is None:
            bounds = np.arange(doc_len, n, doc_len, dtype=np.int64)
            self._split = f"doc_len={doc_len}"
        else:
            bounds = np.concatenate(ends).astype(np.int64)
            bounds = bounds[bounds < n]
            self._split = f"eos_id={eos_id}"
        self._offsets = np.concatenate([[0], bounds, [n]]).astype(np.int64)
        self._lengths = np.diff(self._offsets)

    def _read_tokens(self, first: int, count: int) -> np.ndarray:
        """Tokens [first, first + count) of the file, as a fresh array of its dtype."""
        out = np.empty(count, dtype=self.dtype)
        view = out.data.cast("B")
        offset, done = first * self._itemsize, 0
        try:
            while done < len(view):
                if hasattr(os, "preadv"):
                    got = os.preadv(self._fd, [view[done:]], offset + done)
                else:  # pragma: no cover - platforms without preadv
                    data = os.pread(self._fd, len(view) - done, offset + done)
                    view[done : done + len(data)] = data
                    got = len(data)
                if got == 0:
                    raise self._shrank(first + done // self._itemsize)
                done += got
        except OSError as error:
            raise DataReadError(f"data.path '{self.path}': reading token offset {first} failed: "
                                f"{error.strerror}") from None
        return out

    def _shrank(self, offset: int) -> DataError:
        now = os.fstat(self._fd).st_size // self._itemsize
        return DataError(
            f"{self._offset_text(offset)}: the file shrank to {now} tokens while this run reads it "
            f"(it held {self.num_tokens} at start); restore it, or start a new run on the new data")

    def _offset_text(self, offset: int) -> str:
        return f"data.path '{self.path}' token offset {offset}"

    def _position(self, index: int, offset: int) -> str:
        return self._offset_text(int(self._offsets[index]) + offset)

    def _slice(self, index: int, start: int, stop: int) -> np.ndarray:
        base = int(self._offsets[index])
        return self._read_tokens(base + start, stop - start)

    def _describe(self) -> str:
        return f"'{self.path}'"

    def fingerprint(self) -> str:
        head = self._read_bytes(0, min(self._size, self._HASH_BYTES))
        tail_start = max(0, self._size - self._HASH_BYTES)
        digest = hashlib.sha256(head)
        digest.update(self._read_bytes(tail_start, self._size - tail_start))
        return f"tokens-v1:{self.dtype}:n={self.num_tokens}:{self._split}:{digest.hexdigest()[:16]}"

    def _read_bytes(self, start: int, count: int) -> bytes:
        first, stop = start // self._itemsize, -(-(start + count) // self._itemsize)
        return self._read_tokens(first, stop - first).tobytes()[start - first * self._itemsize :][:count]

    def close(self) -> None:
        """Close the file (reads fail afterwards); garbage collection does it too."""
        self._fd = -1
        self._closer()


# --------------------------------------------------------------------------- jsonl


def _short(value: object, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 128 else f"{str(value)[:20]}..."
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonlSource(_BufferSource):
    """One document per JSON line: `field` is a string (UTF-8 bytes as tokens, vocab 256)
    or a list of token ids. All lines must agree on which; blank lines and empty
    documents are skipped. The file is read into memory and checked eagerly: every line
    must be UTF-8 JSON (a byte-order mark is allowed at the start), an object with the
    field, and every id must lie in [0, vocab_size); an error names the line."""

    def __init__(self, path: PathLike, field: str = "text", *, vocab_size: int | None = None) -> None:
        path = Path(path)
        raw = read_regular(path, "data.path")
        self.path = path
        self.field = field
        limit = _INT32_LIMIT if vocab_size is None else vocab_size
        docs: list[np.ndarray] = []
        kind: type | None = None
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            where = f"data.path '{path}' line {lineno}"
            value = self._field(line, where, field)
            if isinstance(value, str):
                tokens = np.frombuffer(value.encode("utf-8"), dtype=np.uint8)
            elif isinstance(value, list) and all(type(t) is int for t in value):
                bad = next((t for t in value if not 0 <= t < limit), None)
                if bad is not None:
                    raise DataError(f"{where}: field '{field}' has token id {_short(bad)} outside [0, {limit}); "
                                    f"{_id_rule(vocab_size)}")
                tokens = np.array(value, dtype=np.int64)
            else:
                raise DataError(f"{where}: field '{field}' must be a string or a list of ints, "
                                f"not {_short(value)}")
            if kind is not None and type(value) is not kind:
                raise DataError(
                    f"{where}: field '{field}' is a {type(value).__name__}, earlier lines a {kind.__name__}"
                )
            kind = type(value)
            if tokens.size and tokens.max() >= limit:  # text bytes against a vocab below 256
                raise DataError(f"{where}: field '{field}' has token id {int(tokens.max())} outside [0, {limit}); "
                                f"{_id_rule(vocab_size)}")
            if tokens.size:
                docs.append(tokens)
        if not docs:
            raise DataError(f"data.path: '{path}' has no non-empty '{field}' documents")
        self.is_text = kind is str
        super().__init__(docs, np.int32, 256 if self.is_text and vocab_size is None else vocab_size)

    @staticmethod
    def _field(line: bytes, where: str, field: str) -> object:
        """The value of `field` in one JSON line, or a DataError naming what is wrong with the line."""
        try:
            return field_of(parse_line(line), field)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None

    def _position(self, index: int, offset: int) -> str:
        return f"data.path '{self.path}' document {index} token {offset}"

    def _describe(self) -> str:
        return f"'{self.path}'"

    def fingerprint(self) -> str:
        kind = "text" if self.is_text else "ids"
        return f"jsonl-v1:{self.field}:{kind}:{self._content_hash()}"
