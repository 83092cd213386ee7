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
  files move, so a checkpoint can tell whether it resumes the same data.

Documents are never empty: empty files, lines and lists are skipped.
Ids are checked where they are read rather than by a scan at start-up, which a token
file of hundreds of gigabytes could not afford; sources that hold everything in memory
anyway (JSONL) check eagerly too.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike
DEFAULT_TEXT_MAX_BYTES = 4 << 20
TOKEN_DTYPES = ("uint16", "uint32")
_INT32_LIMIT = 2**31


class TokenSource(abc.ABC):
    """Random-access documents of token ids. Subclasses set `_lengths` and `vocab_size`."""

    _lengths: np.ndarray
    vocab_size: int | None

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
            bad = raw[(raw < 0) | (raw >= limit)][0]
            raise ValueError(
                f"{type(self).__name__} {self._describe()}: token id {bad} in document {index} "
                f"is outside [0, {limit}); ids must be below vocab_size"
            )
        return raw.astype(np.int32)

    @abc.abstractmethod
    def _slice(self, index: int, start: int, stop: int) -> np.ndarray:
        """Raw tokens [start, stop) of a document (bounds already checked)."""

    @abc.abstractmethod
    def _describe(self) -> str:
        """Where the data comes from, for error messages."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable identity of the data (not of its location)."""


class _BufferSource(TokenSource):
    """Documents stored back to back in one in-memory array, with an offset table."""

    def __init__(self, docs: list[np.ndarray], dtype: type, vocab_size: int | None) -> None:
        self._lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])
        self._tokens = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
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
            raise ValueError(
                f"SyntheticSource successors: {successors} must lie in [2, vocab_size={vocab_size}]"
            )
        if num_documents < 1 or doc_len < 2:
            raise ValueError(
                f"SyntheticSource num_documents/doc_len: got {num_documents}/{doc_len}; need >= 1 / >= 2"
            )
        if seed < 0:
            raise ValueError(f"SyntheticSource seed: {seed} must be >= 0")
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
    """Regular files under root, depth first, entries sorted by name; hidden ones skipped."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in skip_dirs:
                yield from _sorted_files(Path(entry.path), suffix, skip_dirs)
        elif entry.is_file() and (suffix is None or entry.name.endswith(suffix)):
            yield Path(entry.path)


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
            raise ValueError(f"TextSource max_bytes: {max_bytes} must be >= 1")
        if isinstance(paths, (str, os.PathLike)) and str(paths) == "":
            roots = [Path(sysconfig.get_paths()["stdlib"])]
            suffix, skip = ".py", frozenset({"site-packages", "dist-packages", "__pycache__"})
        else:
            roots = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
            suffix, skip = None, frozenset()
        for root in roots:
            if not root.exists():
                raise ValueError(f"TextSource path: '{root}' does not exist; give a file or directory")

        self.files: list[Path] = []
        docs: list[np.ndarray] = []
        remaining = max_bytes
        for path in self._expand(roots, suffix, skip):
            with open(path, "rb") as f:
                data = f.read(remaining)
            if data:
                self.files.append(path)
                docs.append(np.frombuffer(data, dtype=np.uint8))
                remaining -= len(data)
            if remaining == 0:
                break
        if not docs:
            raise ValueError(f"TextSource path: no non-empty files under {[str(r) for r in roots]}")
        self._where = str(roots[0]) if len(roots) == 1 else f"{len(roots)} paths"
        super().__init__(docs, np.uint8, 256)

    @staticmethod
    def _expand(roots: list[Path], suffix: str | None, skip: frozenset[str]) -> Iterator[Path]:
        for root in roots:
            if root.is_dir():
                yield from _sorted_files(root, suffix, skip)
            else:
                yield root

    def _describe(self) -> str:
        return f"'{self._where}'"

    def fingerprint(self) -> str:
        return f"text-v1:{self._content_hash()}"


# --------------------------------------------------------------------------- token file


class TokenFileSource(TokenSource):
    """A flat file of uint16/uint32 token ids, memory-mapped, read as one long stream.

    The stream is cut into documents of `doc_len` tokens (the last one shorter) or, when
    `eos_id` is given, after every eos token (the eos ends its document; trailing tokens
    form a last document). Finding eos tokens scans the file once, in chunks.
    The fingerprint hashes the size and the first and last MiB, not the whole file.
    """

    _SCAN_CHUNK = 1 << 26
    _HASH_BYTES = 1 << 20

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
            raise ValueError(f"TokenFileSource dtype: '{dtype}' is not allowed; use one of {TOKEN_DTYPES}")
        if not path.is_file():
            raise ValueError(f"TokenFileSource path: '{path}' is not a file")
        itemsize = np.dtype(dtype).itemsize
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"TokenFileSource path: '{path}' is empty; it must hold at least one token")
        if size % itemsize:
            raise ValueError(
                f"TokenFileSource path: '{path}' has {size} bytes, not a multiple of {itemsize} ({dtype})"
            )
        if doc_len < 1:
            raise ValueError(f"TokenFileSource doc_len: {doc_len} must be >= 1")
        if eos_id is not None and not 0 <= eos_id <= np.iinfo(dtype).max:
            raise ValueError(
                f"TokenFileSource eos_id: {eos_id} is outside [0, {np.iinfo(dtype).max}] ({dtype})"
            )
        self.path = path
        self.dtype = dtype
        self.vocab_size = vocab_size
        self._tokens = np.memmap(path, dtype=dtype, mode="r")
        n = len(self._tokens)
        if eos_id is None:
            ends = np.arange(doc_len, n, doc_len, dtype=np.int64)
            self._split = f"doc_len={doc_len}"
        else:
            ends = np.concatenate(
                [np.flatnonzero(self._tokens[s : s + self._SCAN_CHUNK] == eos_id) + s + 1
                 for s in range(0, n, self._SCAN_CHUNK)]
            ).astype(np.int64)
            ends = ends[ends < n]
            self._split = f"eos_id={eos_id}"
        self._offsets = np.concatenate([[0], ends, [n]]).astype(np.int64)
        self._lengths = np.diff(self._offsets)

    def _slice(self, index: int, start: int, stop: int) -> np.ndarray:
        base = int(self._offsets[index])
        return self._tokens[base + start : base + stop]

    def _describe(self) -> str:
        return f"'{self.path}'"

    def fingerprint(self) -> str:
        raw = self._tokens.view(np.uint8)
        digest = hashlib.sha256(raw[: self._HASH_BYTES].tobytes())
        digest.update(raw[-self._HASH_BYTES :].tobytes())
        return f"tokens-v1:{self.dtype}:n={len(self._tokens)}:{self._split}:{digest.hexdigest()[:16]}"


# --------------------------------------------------------------------------- jsonl


class JsonlSource(_BufferSource):
    """One document per JSON line: `field` is a string (UTF-8 bytes as tokens, vocab 256)
    or a list of token ids. All lines must agree on which; blank lines and empty
    documents are skipped. The file is read into memory and checked eagerly."""

    def __init__(self, path: PathLike, field: str = "text", *, vocab_size: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"JsonlSource path: '{path}' is not a file")
        self.path = path
        self.field = field
        raw = path.read_bytes()
        limit = _INT32_LIMIT if vocab_size is None else vocab_size
        docs: list[np.ndarray] = []
        kind: type | None = None
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"JsonlSource {path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{where}: field '{field}' missing; each line must be an object with it")
            value = record[field]
            if isinstance(value, str):
                tokens = np.frombuffer(value.encode("utf-8"), dtype=np.uint8)
            elif isinstance(value, list) and all(type(t) is int for t in value):
                tokens = np.array(value, dtype=np.int64)
            else:
                raise ValueError(f"{where}: field '{field}' must be a string or a list of ints")
            if kind is not None and type(value) is not kind:
                raise ValueError(
                    f"{where}: field '{field}' is a {type(value).__name__}, earlier lines a {kind.__name__}"
                )
            kind = type(value)
            bad = tokens[(tokens < 0) | (tokens >= limit)]
            if bad.size:
                raise ValueError(
                    f"{where}: field '{field}' has token id {int(bad[0])} outside [0, {limit}); "
                    "ids must be below vocab_size"
                )
            if tokens.size:
                docs.append(tokens)
        if not docs:
            raise ValueError(f"JsonlSource path: '{path}' has no non-empty '{field}' documents")
        self.is_text = kind is str
        super().__init__(docs, np.int32, 256 if self.is_text and vocab_size is None else vocab_size)

    def _describe(self) -> str:
        return f"'{self.path}'"

    def fingerprint(self) -> str:
        kind = "text" if self.is_text else "ids"
        return f"jsonl-v1:{self.field}:{kind}:{self._content_hash()}"
