"""Tests of efficient_train.data: sources, packing, the deterministic resumable loader."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from efficient_train.data import (
    Batch,
    DataError,
    DataLoader,
    JsonlSource,
    LoaderState,
    PackedWindows,
    SyntheticSource,
    TextSource,
    TokenFileSource,
    build_loader,
    check_data_config,
)
from efficient_train.data.loader import feistel_permute

# Lengths chosen to cover documents of 1 token, shorter than, equal to and several
# times longer than seq_len = 8 (so documents continue across windows).
DOC_LENGTHS = [5, 1, 8, 23, 2, 9, 1, 1, 17, 4, 30, 3, 8, 11]


def write_jsonl(path: Path, docs: list) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def counting_source(tmp_path: Path) -> JsonlSource:
    """Documents whose tokens are their stream positions, so every token says where it came from."""
    starts = np.cumsum([0] + DOC_LENGTHS)
    docs = [list(range(int(a), int(b))) for a, b in zip(starts[:-1], starts[1:])]
    return JsonlSource(write_jsonl(tmp_path / "ids.jsonl", docs))


def brute_force_labels(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per stream token: which document it belongs to and its index inside it."""
    doc, pos = [], []
    for d, n in enumerate(lengths):
        for i in range(n):
            doc.append(d)
            pos.append(i)
    return np.array(doc), np.array(pos)


# ----------------------------------------------------------------------------- packing


def test_packing_reconstructs_stream(counting_source: JsonlSource) -> None:
    seq_len = 8
    windows = PackedWindows(counting_source, seq_len)
    total = sum(DOC_LENGTHS)
    assert len(windows) == (total - 1) // seq_len
    batch = windows.rows(np.arange(len(windows)))
    stream = np.arange(total)
    rebuilt = np.concatenate([batch.inputs.ravel(), batch.targets[-1, -1:]])
    np.testing.assert_array_equal(rebuilt, stream[: len(windows) * seq_len + 1])
    np.testing.assert_array_equal(batch.targets, batch.inputs + 1)  # the stream, shifted by one
    for name, array in batch.fields().items():
        assert array.shape == (len(windows), seq_len), name
        assert array.dtype == (np.float32 if name == "loss_weights" else np.int32), name


def test_packing_positions_segments_and_loss_weights(counting_source: JsonlSource) -> None:
    seq_len = 8
    windows = PackedWindows(counting_source, seq_len)
    batch = windows.rows(np.arange(len(windows)))
    doc, pos = brute_force_labels(DOC_LENGTHS)
    flat_in = batch.inputs.ravel()  # tokens are stream indices
    np.testing.assert_array_equal(batch.positions.ravel(), pos[flat_in])
    # positions restart at 0 exactly at document starts, and a continued document keeps counting
    assert batch.positions.max() >= seq_len
    # loss weight 0 exactly where the input is its document's last token
    is_last = np.append(doc[1:] != doc[:-1], True)
    np.testing.assert_array_equal(batch.loss_weights.ravel() == 0, is_last[flat_in])
    # segment ids: 1 at each row start, +1 exactly at each document start inside the row
    seg = batch.segment_ids
    assert (seg[:, 0] == 1).all()
    starts_inside = (pos[batch.inputs] == 0)[:, 1:]
    np.testing.assert_array_equal(np.diff(seg, axis=1), starts_inside.astype(np.int32))
    for r in range(seg.shape[0]):
        np.testing.assert_array_equal(seg[r], np.unique(doc[batch.inputs[r]], return_inverse=True)[1] + 1)


def test_packing_random_access_matches_sequential(counting_source: JsonlSource) -> None:
    windows = PackedWindows(counting_source, 5)
    everything = windows.rows(np.arange(len(windows)))
    picked = np.array([7, 0, 3, 3, len(windows) - 1])
    some = windows.rows(picked)
    for name in everything.fields():
        np.testing.assert_array_equal(some.fields()[name], everything.fields()[name][picked])


def test_packing_needs_one_full_row(counting_source: JsonlSource) -> None:
    with pytest.raises(DataError, match=r"^data\.seq_len: the source .* fewer than seq_len \+ 1"):
        PackedWindows(counting_source, sum(DOC_LENGTHS))


# --------------------------------------------------------------------------- synthetic


def chain_log_probs(source: SyntheticSource) -> np.ndarray:
    log_p = np.full((source.vocab_size,) * 2, -np.inf)
    for v in range(source.vocab_size):
        log_p[v, source.successors[v]] = np.log(source.probs[v])
    return log_p


def per_document_nll(log_p: np.ndarray, docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    nll = np.array([-log_p[d[:-1], d[1:]].sum() for d in docs])
    return nll, np.array([len(d) - 1 for d in docs])


def ratio_mean_and_se(nll: np.ndarray, count: np.ndarray) -> tuple[float, float]:
    """Mean nats per transition and its standard error from independent documents."""
    mean = nll.sum() / count.sum()
    resid = nll - mean * count
    return mean, float(np.sqrt((resid**2).sum() * len(nll) / (len(nll) - 1)) / count.sum())


def test_synthetic_best_loss_matches_monte_carlo() -> None:
    source = SyntheticSource(64, seed=8, num_documents=1000)
    docs = [source[i] for i in range(len(source))]
    mean, se = ratio_mean_and_se(*per_document_nll(chain_log_probs(source), docs))
    assert abs(mean - source.best_loss) < 4 * se, (mean, source.best_loss, se)
    assert se < 0.002
    # The test can tell the stationary weighting from a wrong one: an unweighted average of
    # per-token entropies lies many standard errors away.
    entropies = -np.sum(source.probs * np.log(source.probs), axis=1)
    assert abs(entropies.mean() - source.best_loss) > 10 * se
    # stationary distribution: pi P = pi
    moved = np.bincount(source.successors.ravel(), (source.stationary[:, None] * source.probs).ravel(), 64)
    np.testing.assert_allclose(moved, source.stationary, atol=1e-12)


def test_synthetic_documents_start_from_stationary() -> None:
    source = SyntheticSource(64, seed=8, num_documents=10000)
    first = np.array([source.read(i, 0, 1)[0] for i in range(len(source))])
    observed = np.bincount(first, minlength=64)

    def chi2(p: np.ndarray) -> float:
        expected = p * len(first)
        return float(((observed - expected) ** 2 / expected).sum())

    assert chi2(source.stationary) < 103.4  # 99.9% quantile of chi-square with 63 dof
    assert chi2(np.full(64, 1 / 64)) > 1000  # pi is far from uniform: the check has power


def test_bigram_counts_reach_best_loss() -> None:
    vocab = 64
    source = SyntheticSource(vocab, seed=1, num_documents=3000)
    train = [source[i] for i in range(1000, 3000)]
    held_out = [source[i] for i in range(1000)]
    counts = np.zeros((vocab, vocab))
    for d in train:
        np.add.at(counts, (d[:-1], d[1:]), 1)
    smoothed = (counts + 0.1) / (counts + 0.1).sum(axis=1, keepdims=True)
    bigram, _ = ratio_mean_and_se(*per_document_nll(np.log(smoothed), held_out))
    truth, se = ratio_mean_and_se(*per_document_nll(chain_log_probs(source), held_out))
    assert 0 < bigram - truth < 0.01  # a learner gets within 0.01 nats of the truth ...
    assert abs(truth - source.best_loss) < 4 * se  # ... which is best_loss
    assert np.log(vocab) - source.best_loss > 3  # and far below a uniform guess


def test_synthetic_is_deterministic_with_random_access() -> None:
    a = SyntheticSource(100, seed=3, num_documents=50, doc_len=40)
    b = SyntheticSource(100, seed=3, num_documents=50, doc_len=40)
    c = SyntheticSource(100, seed=4, num_documents=50, doc_len=40)
    np.testing.assert_array_equal(a[17], b[17])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not np.array_equal(a[17][:20], c[17][:20])
    np.testing.assert_array_equal(a.read(17, 5, 12), a[17][5:12])
    lengths = a.document_lengths()
    assert lengths.min() >= 20 and lengths.max() <= 40 and len(np.unique(lengths)) > 5
    doc = a[17]
    assert doc.dtype == np.int32 and len(doc) == lengths[17]
    # every transition is one the table allows
    assert all(nxt in a.successors[cur] for cur, nxt in zip(doc[:-1], doc[1:]))


# -------------------------------------------------------------------------------- text


def test_text_default_reads_stdlib_sources() -> None:
    source = TextSource(max_bytes=200_000)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert source.vocab_size == 256
    assert all(f.suffix == ".py" and stdlib in f.parents for f in source.files)
    assert not any("site-packages" in f.parts for f in source.files)
    parts = [f.relative_to(stdlib).parts for f in source.files]
    assert parts == sorted(parts)
    assert source.document_lengths().sum() == 200_000  # the stdlib is larger: capped exactly
    np.testing.assert_array_equal(source[0], np.frombuffer(source.files[0].read_bytes(), np.uint8))
    last = source.files[-1].read_bytes()[: source.document_lengths()[-1]]
    np.testing.assert_array_equal(source[len(source) - 1], np.frombuffer(last, np.uint8))
    assert source.fingerprint() == TextSource(max_bytes=200_000).fingerprint()
    assert source.fingerprint() != TextSource(max_bytes=100_000).fingerprint()


def test_text_directory_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_bytes(b"bz")
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "c.txt").write_bytes("é".encode())
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"h")
    source = TextSource(tmp_path)
    assert [f.name for f in source.files] == ["a.txt", "z.txt", "c.txt"]
    assert [bytes(source[i].astype(np.uint8)) for i in range(len(source))] == [b"a", b"bz", "é".encode()]
    with pytest.raises(DataError, match=r"^data\.path: .*missing' does not exist"):
        TextSource(tmp_path / "missing")


# -------------------------------------------------------------------------- token file


@pytest.mark.parametrize("dtype, largest", [("uint16", 2**16 - 1), ("uint32", 2**31 - 1)])
def test_token_file_round_trip(tmp_path: Path, dtype: str, largest: int) -> None:
    tokens = np.random.default_rng(0).integers(0, largest, size=1000, endpoint=True).astype(dtype)
    tokens[-1] = largest  # the largest id an int32 batch can hold survives, above 2**16 for uint32
    path = tmp_path / f"tokens.{dtype}"
    tokens.tofile(path)
    source = TokenFileSource(path, dtype, doc_len=300)
    np.testing.assert_array_equal(source.document_lengths(), [300, 300, 300, 100])
    np.testing.assert_array_equal(np.concatenate([source[i] for i in range(4)]), tokens.astype(np.int64))
    assert source[3][-1] == largest
    np.testing.assert_array_equal(source.read(1, 10, 20), tokens[310:320])


def test_token_file_refuses_ids_beyond_int32(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    np.array([1, 2**32 - 1], dtype=np.uint32).tofile(path)
    with pytest.raises(DataError, match=r"^data\.path '.*big\.bin' token offset 1: token id 4294967295 is outside "
                                        r"\[0, 2147483648\)"):
        TokenFileSource(path, "uint32")


def test_token_file_eos_split_and_vocab_check(tmp_path: Path) -> None:
    eos = 0
    tokens = np.array([5, 6, eos, 7, eos, eos, 8, 9, 900], dtype=np.uint16)
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    source = TokenFileSource(path, "uint16", eos_id=eos, vocab_size=1000)
    assert [list(source[i]) for i in range(len(source))] == [[5, 6, 0], [7, 0], [0], [8, 9, 900]]
    # The eos scan reads the whole file anyway, so it checks every id at start-up.
    with pytest.raises(DataError, match=r"^data\.path '.*t\.bin' token offset 8: token id 900 is outside \[0, 512\)"):
        TokenFileSource(path, "uint16", eos_id=eos, vocab_size=512)
    assert source.fingerprint() != TokenFileSource(path, "uint16", doc_len=4).fingerprint()


def test_token_file_errors(tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"^data\.token_dtype: 'int8' is not allowed"):
        TokenFileSource(odd, "int8")
    with pytest.raises(DataError, match=r"^data\.path: .*odd\.bin' has 3 bytes, not a multiple of 2 \(uint16\)"):
        TokenFileSource(odd, "uint16")
    with pytest.raises(DataError, match=r"^data\.path: .*empty\.bin' is empty"):
        TokenFileSource(empty, "uint16")
    with pytest.raises(DataError, match=r"^data\.path: .*missing\.bin' does not exist"):
        TokenFileSource(tmp_path / "missing.bin")
    with pytest.raises(DataError, match=r"^data\.path: .*' is a directory; a regular file is needed"):
        TokenFileSource(tmp_path)


# ------------------------------------------------------------------------------- jsonl


def test_jsonl_text_and_token_lists(tmp_path: Path) -> None:
    text = JsonlSource(write_jsonl(tmp_path / "t.jsonl", ["héllo", "", "ab"]))
    assert text.is_text and text.vocab_size == 256 and len(text) == 2  # empty document skipped
    np.testing.assert_array_equal(text[0], list("héllo".encode()))
    ids = JsonlSource(write_jsonl(tmp_path / "i.jsonl", [[3, 1, 4], [1, 5]]), vocab_size=10)
    assert not ids.is_text
    assert [list(ids[i]) for i in range(2)] == [[3, 1, 4], [1, 5]]
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"body": [3, 1, 4]}) + "\n\n" + json.dumps({"body": [1, 5]}) + "\n")
    body = JsonlSource(other, "body")  # another field name; a blank line is skipped
    assert [list(body[i]) for i in range(len(body))] == [[3, 1, 4], [1, 5]]
    assert body.fingerprint() != ids.fingerprint() != text.fingerprint()


@pytest.mark.parametrize(
    "lines, field, vocab, message",
    [
        (['{"text": [1, 2]}', '{"text": "ab"}'], "text", None,
         r" line 2: field 'text' is a str, earlier lines a list"),
        (['{"body": "ab"}'], "text", None, r" line 1: field 'text' missing"),
        (['{"text": [1, 2.5]}'], "text", None, r" line 1: field 'text' must be a string or a list of ints"),
        (['{"text": [1, 20]}'], "text", 10, r" line 1: field 'text' has token id 20 outside \[0, 10\)"),
        (['{"text": [-1]}'], "text", None, r" line 1: field 'text' has token id -1 outside"),
        (["not json"], "text", None, r" line 1: not valid JSON"),
        (["", " "], "text", None, r"^data\.path: .* has no non-empty 'text' documents"),
    ],
)
def test_jsonl_errors(tmp_path: Path, lines: list[str], field: str, vocab: int | None, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        JsonlSource(path, field, vocab_size=vocab)


# ------------------------------------------------------------------------------ loader


@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_feistel_is_a_permutation(size: int) -> None:
    perm = feistel_permute(np.arange(size), size, seed=0, epoch=0)
    np.testing.assert_array_equal(np.sort(perm), np.arange(size))
    if size >= 16:
        assert not np.array_equal(perm, np.arange(size))
        assert not np.array_equal(perm, feistel_permute(np.arange(size), size, seed=0, epoch=1))
        assert not np.array_equal(perm, feistel_permute(np.arange(size), size, seed=1, epoch=0))


def collect(loader: DataLoader, steps: int) -> list[Batch]:
    return [next(loader) for _ in range(steps)]


def assert_batches_equal(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in x.fields():
            np.testing.assert_array_equal(x.fields()[name], y.fields()[name], err_msg=name)


def test_loader_epochs_are_permutations(counting_source: JsonlSource) -> None:
    loader = DataLoader(counting_source, seq_len=4, global_batch_size=4, seed=0)
    windows = loader.num_windows  # 35: batches straddle epoch boundaries
    starts = np.concatenate([b.inputs[:, 0] for b in collect(loader, 3 * windows // 4 + 1)])
    for epoch in range(3):
        seen = starts[epoch * windows : (epoch + 1) * windows] // 4
        np.testing.assert_array_equal(np.sort(seen), np.arange(windows))
    assert not np.array_equal(starts[:windows], starts[windows : 2 * windows])  # a fresh order per epoch
    in_order = DataLoader(counting_source, seq_len=4, global_batch_size=4, seed=0, shuffle=False)
    np.testing.assert_array_equal(next(in_order).inputs[:, 0], [0, 4, 8, 12])


def test_two_processes_see_what_one_process_sees() -> None:
    source = SyntheticSource(50, seed=0, num_documents=40, doc_len=30)
    one = DataLoader(source, seq_len=16, global_batch_size=8, seed=5)
    parts = [
        DataLoader(source, seq_len=16, global_batch_size=8, seed=5, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert parts[0].batch_shape == (4, 16)
    steps = one.num_windows // 8 + 3  # past an epoch boundary
    whole = collect(one, steps)
    halves = [collect(part, steps) for part in parts]
    joined = [
        Batch(**{n: np.concatenate([h0.fields()[n], h1.fields()[n]]) for n in h0.fields()})
        for h0, h1 in zip(*halves)
    ]
    assert_batches_equal(joined, whole)
    assert not np.array_equal(halves[0][0].inputs, halves[1][0].inputs)


def test_resume_continues_the_exact_stream(counting_source: JsonlSource) -> None:
    def make() -> DataLoader:
        return DataLoader(counting_source, seq_len=4, global_batch_size=6, seed=2)

    uninterrupted = make()
    reference = collect(uninterrupted, 12)
    first = make()
    collect(first, 5)
    saved = json.loads(json.dumps(first.state().to_dict()))
    resumed = make()
    resumed.restore(LoaderState.from_dict(saved))
    assert resumed.step == 5
    assert_batches_equal(collect(resumed, 7), reference[5:])


def test_mismatched_state_is_refused(counting_source: JsonlSource, tmp_path: Path) -> None:
    loader = DataLoader(counting_source, seq_len=4, global_batch_size=6, seed=2)
    next(loader)
    state = loader.state()
    cases = {
        "seq_len": DataLoader(counting_source, seq_len=5, global_batch_size=6, seed=2),
        "global_batch_size": DataLoader(counting_source, seq_len=4, global_batch_size=3, seed=2),
        "seed": DataLoader(counting_source, seq_len=4, global_batch_size=6, seed=3),
        "fingerprint": DataLoader(
            JsonlSource(write_jsonl(tmp_path / "x.jsonl", [list(range(40))])),
            seq_len=4,
            global_batch_size=6,
            seed=2,
        ),
    }
    for field, other in cases.items():
        with pytest.raises(DataError, match=rf"^data loader state {field}: checkpoint has"):
            other.restore(state)
        assert other.step == 0
    with pytest.raises(DataError, match=r"^data loader state: checkpoint holds \[.*'extra'"):
        LoaderState.from_dict({**state.to_dict(), "extra": 1})
    with pytest.raises(DataError, match=r"^data loader state step: checkpoint has '5', expected int"):
        LoaderState.from_dict({**state.to_dict(), "step": "5"})


def test_loader_argument_errors(counting_source: JsonlSource) -> None:
    with pytest.raises(ValueError, match=r"^global_batch_size: 6 is not divisible by process_count 4"):
        DataLoader(counting_source, seq_len=4, global_batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"^process_index: 2 must lie in \[0, process_count=2\)"):
        DataLoader(counting_source, seq_len=4, global_batch_size=6, seed=0, process_index=2, process_count=2)


# ------------------------------------------------------------------------------ config


def data_config(**overrides: object) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(source="synthetic", path="", seq_len=16, seed=0, shuffle=True, max_bytes=100_000,
             token_dtype="uint16", eos_id=-1, jsonl_field="text")
    )
    cfg.update(overrides)
    return cfg


def test_build_loader_for_every_source(tmp_path: Path) -> None:
    np.arange(200, dtype=np.uint32).tofile(tmp_path / "t.bin")
    write_jsonl(tmp_path / "d.jsonl", ["some text " * 10, "more"])
    configs = {
        "synthetic": data_config(),
        "text": data_config(source="text"),
        "tokens": data_config(source="tokens", path=str(tmp_path / "t.bin"), token_dtype="uint32"),
        "jsonl": data_config(source="jsonl", path=str(tmp_path / "d.jsonl")),
    }
    for name, cfg in configs.items():
        loader = build_loader(cfg, vocab_size=300, global_batch_size=4, process_index=1, process_count=2)
        batch = next(loader)
        assert batch.shape == (2, 16), name
        assert batch.inputs.max() < 300, name
    tokens = build_loader(configs["tokens"], vocab_size=300, global_batch_size=2)
    assert tokens.num_windows == 12  # documents of seq_len tokens: one per row
    np.testing.assert_array_equal(tokens._windows.rows(np.array([1])).positions[0], np.arange(16))
    configs["tokens"].update(dict(eos_id=5, shuffle=False))  # documents [0..5], [6..199]
    split = next(build_loader(configs["tokens"], vocab_size=300, global_batch_size=2))
    np.testing.assert_array_equal(split.positions[0], [0, 1, 2, 3, 4, 5] + list(range(10)))
    np.testing.assert_array_equal(split.segment_ids[0], [1] * 6 + [2] * 10)
    np.testing.assert_array_equal(split.loss_weights[0] == 0, np.arange(16) == 5)


@pytest.mark.parametrize(
    "overrides, vocab, message",
    [
        (dict(source="parquet"), 300, r"^data\.source: 'parquet' is not one of 'synthetic', 'text'"),
        (dict(source="text"), 100, r"^data\.source: 'text' is byte-level and needs vocab_size >= 256"),
        (dict(source="text", path="/no/such/dir"), 300, r"^data\.path: '/no/such/dir' does not exist"),
        (dict(source="tokens", path="/no/such.bin"), 300, r"^data\.path: '/no/such\.bin' does not exist"),
        (dict(source="jsonl", path="/"), 300, r"^data\.path: '/' is a directory; source 'jsonl' needs a regular file"),
        (dict(source="jsonl", path=""), 300, r"^data\.path: '' is not a file; source 'jsonl' needs one"),
        (dict(seq_len=0), 300, r"^data\.seq_len: 0 must be an int >= 1"),
        (dict(seed=-1), 300, r"^data\.seed: -1 must be an int >= 0"),
        (dict(source="text", max_bytes=0), 300, r"^data\.max_bytes: 0 must be an int >= 1"),
        (dict(), 2, r"^data\.source: 'synthetic' needs vocab_size >= 3"),
    ],
)
def test_check_data_config_names_the_field(overrides: dict, vocab: int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        check_data_config(data_config(**overrides), vocab)


def test_check_data_config_token_fields(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"^data\.token_dtype: 'int64' is not one of 'uint16', 'uint32'"):
        check_data_config(data_config(source="tokens", path=str(path), token_dtype="int64"), 300)
    jsonl = write_jsonl(tmp_path / "d.jsonl", ["x"])
    with pytest.raises(ValueError, match=r"^data\.eos_id: 300 must be below vocab_size 300"):
        check_data_config(data_config(source="tokens", path=str(path), eos_id=300), 300)
    with pytest.raises(ValueError, match=r"^data\.jsonl_field: '' must be a non-empty string"):
        check_data_config(data_config(source="jsonl", path=str(jsonl), jsonl_field=""), 300)
    cfg = data_config()
    del cfg["shuffle"]
    with pytest.raises(ValueError, match=r"^data\.shuffle: missing"):
        check_data_config(cfg, 300)
