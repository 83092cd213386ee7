"""Tests of tokenizers, `prepare`, prepared sources, the token cache and chat loss masks,
on real files: a BPE tokenizer trained here on local text, small corpora written here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from efficient_train.data import Batch, DataError, build_loader
from efficient_train.data.manifest import MANIFEST_NAME, read_manifest, shard_path
from efficient_train.data.prepare import prepare
from efficient_train.data.prepared import PreparedSource
from efficient_train.data.tokenizer import load_tokenizer
from efficient_train.train.loss import next_token_loss
from tests.support.data_setup import make_tokenizer
from tests.support.subprocess_env import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [f"record {i}: the quick brown fox {'jumps ' * (i % 7)}over dog {i * 37}." for i in range(120)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "model")


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def shard_bytes(directory: Path) -> dict[str, bytes]:
    """Every listed shard file's bytes, by name."""
    return {p.name: p.read_bytes() for p in sorted((directory / "shards").iterdir()) if not p.name.startswith(".")}


def data_config(**overrides: object) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(source="prepared", path="", seq_len=16, seed=0, shuffle=True,
                                         max_bytes=100_000, token_dtype="uint16", eos_id=-1, jsonl_field="text",
                                         tokenizer="", mixture=""))
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------------- tokenizers


def test_tokenizer_file_directory_and_special_tokens(tok: Path, tmp_path: Path) -> None:
    by_dir, by_file = load_tokenizer(tok), load_tokenizer(tok / "tokenizer.json")
    assert by_dir.fingerprint == by_file.fingerprint and by_dir.vocab_size == 320
    bos, eos = by_dir.bos_id, by_dir.eos_id
    ids = by_dir.encode_documents(["the quick fox"])[0]
    assert ids[0] == bos and ids[-1] == eos and bos not in ids[1:-1]  # add_bos_token / add_eos_token: true
    # Without the flags, tokenizer.json's post-processor decides: a template that adds bos only.
    plain = make_tokenizer(tmp_path / "plain", config={"bos_token": "<s>", "eos_token": "</s>"})
    raw = json.loads((plain / "tokenizer.json").read_text())
    raw["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                             {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {
                             "<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}}
    (plain / "tokenizer.json").write_text(json.dumps(raw))
    ids = load_tokenizer(plain).encode_documents(["the quick fox"])[0]
    assert ids[0] == bos and ids[-1] != eos
    no_specials = make_tokenizer(tmp_path / "none", config={"add_bos_token": False, "bos_token": "<s>"})
    assert bos not in load_tokenizer(no_specials).encode_documents(["the quick fox"])[0]
    assert load_tokenizer(plain).fingerprint != by_dir.fingerprint
    assert load_tokenizer("").encode_documents(["hé"])[0].tolist() == [104, 195, 169]  # byte-level default


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "tokenizer.json").unlink(), r"has no tokenizer\.json"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), r"is not a tokenizer\.json the tokenizers library reads"),
    (lambda d: (d / "tokenizer_config.json").write_text("{"), r"tokenizer_config\.json' is not JSON"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"bos_token": "<nope>"}'), r"bos_token '<nope>' is not in"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"add_bos_token": "yes"}'), r"add_bos_token is 'yes'"),
])
def test_tokenizer_errors_name_the_file(tok: Path, tmp_path: Path, setup, message: str) -> None:
    copy = Path(shutil.copytree(tok, tmp_path / "copy"))
    setup(copy)
    with pytest.raises(DataError, match=message):
        load_tokenizer(copy)


# ------------------------------------------------------------------------------- prepare


def test_prepare_round_trip_split_and_dtype(tok: Path, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    manifest = prepare([str(corpus)], tmp_path / "out", tokenizer=str(tok), fmt="jsonl", validation_fraction=0.25,
                       shard_bytes=1000, progress=False)
    totals, tokenizer = manifest["totals"], load_tokenizer(tok)
    assert manifest["complete"] and len(manifest["shards"]) > 3
    assert totals["train"]["documents"] + totals["validation"]["documents"] == len(TEXTS)
    assert 10 < totals["validation"]["documents"] < 50
    assert manifest["identity"]["token_dtype"] == "uint16"
    assert (tmp_path / "out/shards/000000.train.tokens").stat().st_size % 2 == 0
    train, valid = PreparedSource(tmp_path / "out", "train"), PreparedSource(tmp_path / "out", "validation")
    decoded = [tokenizer._tokenizer.decode(s[i].tolist()) for s in (train, valid) for i in range(len(s))]
    assert sorted(decoded) == sorted(TEXTS)  # every record once, in one split, text intact
    in_order = [tokenizer._tokenizer.decode(train[i].tolist()) for i in range(len(train))]
    assert in_order == [t for t in TEXTS if t in in_order]  # documents keep the input's order
    # The split is a function of the content: the same again, and workers do not change a byte.
    again = prepare([str(corpus)], tmp_path / "again", tokenizer=str(tok), fmt="jsonl", validation_fraction=0.25,
                    shard_bytes=1000, progress=False, workers=2)
    assert again["totals"] == totals and shard_bytes(tmp_path / "again") == shard_bytes(tmp_path / "out")


def test_prepare_text_files_and_uint32(tmp_path: Path) -> None:
    big = make_tokenizer(tmp_path / "big", vocab_size=70_000, corpus=TEXTS)  # the trainer stops at what it can learn
    for i in range(3):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text(TEXTS[i] * 3)
    manifest = prepare([str(tmp_path / "docs")], tmp_path / "out", tokenizer=str(big), progress=False)
    assert manifest["totals"]["train"]["documents"] == 3  # a document per file
    bytes_only = prepare([str(tmp_path / "docs" / "*.txt")], tmp_path / "bytes", progress=False)
    assert bytes_only["identity"]["vocab_size"] == 256
    source = PreparedSource(tmp_path / "bytes")
    assert bytes(source[1].astype(np.uint8)) == (TEXTS[1] * 3).encode()
    if load_tokenizer(big).vocab_size > 65536:
        assert manifest["identity"]["token_dtype"] == "uint32"


def test_prepare_resumes_from_committed_shards(tok: Path, tmp_path: Path) -> None:
    """A prepare that stopped after some units (a renamed shard not yet listed, a temp file half
    written) finishes on rerun to exactly the bytes of an uninterrupted prepare."""
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    args = dict(tokenizer=str(tok), fmt="jsonl", shard_bytes=800, progress=False)
    clean = prepare([str(corpus)], tmp_path / "clean", **args)
    prepare([str(corpus)], tmp_path / "cut", **args)
    manifest = read_manifest(tmp_path / "cut", "test")
    listed = sorted(manifest["shards"], key=int)
    for unit in listed[3:]:
        del manifest["shards"][unit]
    manifest["complete"] = False
    del manifest["totals"]
    (tmp_path / "cut" / MANIFEST_NAME).write_text(json.dumps(manifest))
    shard_path(tmp_path / "cut", 4, "train", "tokens").write_bytes(b"\x07" * 10)  # renamed, never listed
    half = shard_path(tmp_path / "cut", 5, "train", "tokens")
    half.with_name(f".{half.name}.tmp").write_bytes(b"\x01\x02\x03")  # killed mid-write
    half.unlink()
    with pytest.raises(DataError, match=r"is not complete \(3 shards committed\); rerun the prepare command"):
        PreparedSource(tmp_path / "cut")
    resumed = prepare([str(corpus)], tmp_path / "cut", **args)
    assert resumed["totals"] == clean["totals"]
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "clean")


@pytest.mark.slow
def test_killed_prepare_resumes(tok: Path, tmp_path: Path) -> None:
    """SIGKILL a real `efficient-train prepare` once it has committed a shard; the rerun finishes it
    to the same bytes as an uninterrupted run."""
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS * 8)
    command = [sys.executable, "-m", "efficient_train.cli", "prepare", "--input", str(corpus), "--tokenizer",
               str(tok), "--format", "jsonl", "--workers", "1", "--shard_bytes", "300"]
    env = subprocess_env(1)
    process = subprocess.Popen([*command, "--output", str(tmp_path / "cut")], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = None
    while process.poll() is None:
        time.sleep(0.01)
        try:
            manifest = read_manifest(tmp_path / "cut", "test")
        except DataError:
            continue
        if manifest is not None and len(manifest["shards"]) >= 5:
            process.kill()
            break
    process.wait()
    assert manifest is not None and not manifest["complete"], "prepare finished before it could be killed"
    for out in ("cut", "clean"):
        subprocess.run([*command, "--output", str(tmp_path / out)], env=env, cwd=ROOT, check=True,
                       capture_output=True)
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "clean")


def test_bad_records_fatal_or_counted(tok: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "good one"}\nnot json\n{"body": "x"}\n\xff\xfe\n{"text": 5}\n[1]\n{"text": "fine"}\n')
    expected = [r"line 2: not valid JSON", r"line 3: field 'text' missing", r"line 4: not UTF-8 \(byte 0xff",
                r"line 5: field 'text' is of type int", r"line 6: a JSON list"]
    with pytest.raises(DataError, match=rf"^'{bad}' {expected[0]}.*pass --on_error skip"):
        prepare([str(bad)], tmp_path / "fatal", tokenizer=str(tok), fmt="jsonl", progress=False)
    manifest = prepare([str(bad)], tmp_path / "skip", tokenizer=str(tok), fmt="jsonl", on_error="skip",
                       progress=False)
    assert manifest["totals"]["skipped"] == 5 and manifest["totals"]["train"]["documents"] == 2
    errors = [e for shard in manifest["shards"].values() for e in shard["errors"]]
    for message, pattern in zip(errors, expected):
        assert pytest.importorskip("re").search(pattern, message), message
    text = tmp_path / "t.txt"
    text.write_bytes(b"one\ntwo\nthr\xc3e\n")
    with pytest.raises(DataError, match=rf"^'{text}' line 3: not UTF-8 \(byte 0xc3\)"):
        prepare([str(text)], tmp_path / "text", progress=False)


def test_prepare_refuses_other_inputs_and_foreign_directories(tok: Path, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS[:20])
    prepare([str(corpus)], tmp_path / "out", tokenizer=str(tok), fmt="jsonl", progress=False)
    before = shard_bytes(tmp_path / "out")
    write_jsonl(corpus, TEXTS[:21])
    with pytest.raises(DataError, match=r"was prepared from other inputs; give a new --output directory"):
        prepare([str(corpus)], tmp_path / "out", tokenizer=str(tok), fmt="jsonl", progress=False)
    with pytest.raises(DataError, match=r"was prepared from other tokenizer, vocab_size, inputs"):
        prepare([str(corpus)], tmp_path / "out", fmt="jsonl", progress=False)
    assert shard_bytes(tmp_path / "out") == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"is not empty and holds no manifest\.json"):
        prepare([str(corpus)], tmp_path / "foreign", progress=False)
    with pytest.raises(DataError, match=r"^--input: '.*nothing\*\.jsonl' matches no file"):
        prepare([str(tmp_path / "nothing*.jsonl")], tmp_path / "x", progress=False)
    with pytest.raises(DataError, match=r"^--format: 'csv' is not one of text, jsonl, parquet, chat"):
        prepare([str(corpus)], tmp_path / "x", fmt="csv", progress=False)


def test_prepared_source_refuses_damaged_shards(tok: Path, tmp_path: Path) -> None:
    prepare([str(write_jsonl(tmp_path / "c.jsonl", TEXTS))], tmp_path / "out", tokenizer=str(tok), fmt="jsonl",
            progress=False)
    with pytest.raises(DataError, match=r"tokenizer of 320 tokens; model\.vocab_size 300 is smaller"):
        PreparedSource(tmp_path / "out", vocab_size=300)
    tokens = shard_path(tmp_path / "out", 0, "train", "tokens")
    os.truncate(tokens, tokens.stat().st_size - 2)
    with pytest.raises(DataError, match=r"000000\.train\.tokens' holds \d+ bytes, the manifest says \d+"):
        PreparedSource(tmp_path / "out")
    with pytest.raises(DataError, match=r"holds no manifest\.json; make it with `efficient-train prepare"):
        PreparedSource(tmp_path)


def test_parquet(tok: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": TEXTS[:30], "n": list(range(30))}), path, row_group_size=7)
    manifest = prepare([str(path)], tmp_path / "out", tokenizer=str(tok), fmt="parquet", shard_bytes=1,
                       progress=False)
    assert manifest["totals"]["train"]["documents"] == 30 and len(manifest["shards"]) == 5
    pq.write_table(pa.table({"text": ["a", None, "b"]}), path)
    with pytest.raises(DataError, match=rf"^'{path}' row 2: column 'text' is null; it must be a string"):
        prepare([str(path)], tmp_path / "null", tokenizer=str(tok), fmt="parquet", progress=False)
    with pytest.raises(DataError, match=r"no column 'body'; columns: text"):
        prepare([str(path)], tmp_path / "col", fmt="parquet", field="body", progress=False)


# -------------------------------------------------------------------------- training data


def test_prepared_loader_resumes_exactly(tok: Path, tmp_path: Path) -> None:
    prepare([str(write_jsonl(tmp_path / "c.jsonl", TEXTS))], tmp_path / "out", tokenizer=str(tok), fmt="jsonl",
            shard_bytes=700, progress=False)
    cfg = data_config(path=str(tmp_path / "out"), tokenizer=str(tok))
    straight = build_loader(cfg, vocab_size=320, global_batch_size=4)
    batches = [next(straight) for _ in range(12)]
    resumed = build_loader(cfg, vocab_size=320, global_batch_size=4)
    for _ in range(5):
        next(resumed)
    state = resumed.state()
    again = build_loader(cfg, vocab_size=320, global_batch_size=4)
    again.restore(state)
    for expected in batches[5:]:
        got = next(again)
        for name, value in expected.fields().items():
            np.testing.assert_array_equal(getattr(got, name), value)
    assert batches[0].inputs.max() >= 256  # BPE ids, not bytes
    other = make_tokenizer(tmp_path / "other", config={"bos_token": "</s>"})
    with pytest.raises(DataError, match=r"was prepared with another tokenizer than"):
        build_loader(data_config(path=str(tmp_path / "out"), tokenizer=str(other)), vocab_size=320,
                     global_batch_size=4)


def test_tokenizer_on_raw_text_prepares_a_cache_once(tok: Path, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    cfg = data_config(source="jsonl", path=str(corpus), tokenizer=str(tok))
    first = next(build_loader(cfg, vocab_size=320, global_batch_size=2, cache_dir=str(tmp_path / "cache")))
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    stamp = (cache / MANIFEST_NAME).stat().st_mtime_ns
    second = next(build_loader(cfg, vocab_size=320, global_batch_size=2, cache_dir=str(tmp_path / "cache")))
    np.testing.assert_array_equal(first.inputs, second.inputs)
    assert (cache / MANIFEST_NAME).stat().st_mtime_ns == stamp  # reused, not rewritten
    write_jsonl(corpus, TEXTS[:60])
    build_loader(cfg, vocab_size=320, global_batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2  # edited input: a new cache
    text = data_config(source="text", path=str(tmp_path / "c.jsonl"), tokenizer=str(tok))
    assert next(build_loader(text, vocab_size=320, global_batch_size=2, cache_dir=str(tmp_path / "cache"))).shape
    with pytest.raises(DataError, match=r"has 320 tokens; model\.vocab_size 256 is smaller"):
        build_loader(cfg, vocab_size=256, global_batch_size=2, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------- chat


def test_chat_loss_mask_zeroes_prompt_gradients(tok: Path, tmp_path: Path) -> None:
    conversations = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"count to {i}"},
                      {"role": "assistant", "content": " ".join(map(str, range(i)))},
                      {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "the fox"}]
                     for i in range(1, 30)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    prepare([str(path)], tmp_path / "out", tokenizer=str(tok), fmt="chat", progress=False)
    source, tokenizer = PreparedSource(tmp_path / "out", vocab_size=320), load_tokenizer(tok)
    ids, mask = source[2], source.read_mask(2, 0, len(source[2]))
    assistant = tokenizer._tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert assistant == "0 1 2<|end|>the fox<|end|>"  # content and end of turn, nothing of the prompt
    loader = build_loader(data_config(path=str(tmp_path / "out"), seq_len=32), vocab_size=320, global_batch_size=4)
    batch = jax.tree.map(jnp.asarray, next(loader))
    assert 0 < float(batch.loss_weights.sum()) < batch.loss_weights.size
    logits = jax.random.normal(jax.random.key(0), (*batch.shape, 320))

    def loss(logits: jax.Array, batch: Batch) -> jax.Array:
        total, weight = next_token_loss(lambda *_: logits, batch)
        return total / weight

    grads = jax.grad(loss)(logits, batch)
    masked = np.asarray(batch.loss_weights) == 0
    assert np.all(np.asarray(grads)[masked] == 0.0)  # exactly zero: prompt tokens teach nothing
    assert np.all(np.abs(np.asarray(grads)[~masked]).sum(-1) > 0)
    changed = batch.replace(targets=jnp.where(batch.loss_weights == 0, (batch.targets + 1) % 320, batch.targets))
    assert float(loss(logits, changed)) == float(loss(logits, batch))


def test_chat_errors(tok: Path, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": ["not", "text"]}]}) + "\n")
    with pytest.raises(DataError, match=rf"^'{path}' line 1: messages\[0\] must be an object with string 'role'"):
        prepare([str(path)], tmp_path / "out", tokenizer=str(tok), fmt="chat", progress=False)
    plain = make_tokenizer(tmp_path / "plain", config={})
    with pytest.raises(DataError, match=r"--format chat: the tokenizer .* has no chat_template"):
        prepare([str(path)], tmp_path / "out2", tokenizer=str(plain), fmt="chat", progress=False)
    raising = make_tokenizer(tmp_path / "raising", config={
        "chat_template": "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"})
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: the chat template refused the conversation: system first"):
        prepare([str(path)], tmp_path / "out3", tokenizer=str(raising), fmt="chat", progress=False)
    sneaky = make_tokenizer(tmp_path / "sneaky", config={"chat_template": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(DataError, match=r"the chat template failed: SecurityError"):
        prepare([str(path)], tmp_path / "out4", tokenizer=str(sneaky), fmt="chat", progress=False)


# ------------------------------------------------------------------------------ mixtures


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two byte-level prepared directories whose tokens say which one they came from ('a' or 'b')."""
    root = tmp_path_factory.mktemp("mix")
    for name, size in (("a", 40), ("b", 25)):
        write_jsonl(root / f"{name}.jsonl", [name * (10 + i % 9) for i in range(size)])
        prepare([str(root / f"{name}.jsonl")], root / name, fmt="jsonl", shard_bytes=200, progress=False)
    return root / "a", root / "b"


def mixture_loader(dirs: tuple[Path, Path], weights: str, **kwargs):
    spec = ",".join(f"{d}:{w}" for d, w in zip(dirs, weights.split(",")))
    return build_loader(data_config(mixture=spec, seq_len=8), vocab_size=256, **{"global_batch_size": 8, **kwargs})


def test_mixture_realizes_its_weights(two_dirs: tuple[Path, Path]) -> None:
    loader = mixture_loader(two_dirs, "0.7,0.3")
    rows_from_a = 0
    for _ in range(1000):
        batch = next(loader)
        from_a = (batch.inputs == ord("a")).any(1)
        assert np.all(from_a != (batch.inputs == ord("b")).any(1))  # each row from one source
        rows_from_a += int(from_a.sum())
    assert abs(rows_from_a / 8000 - 0.7) < 0.01
    metrics = loader.metrics()
    assert metrics == {"mixture/a": rows_from_a / 8000, "mixture/b": (8000 - rows_from_a) / 8000}


def test_mixture_resumes_exactly_and_splits_over_processes(two_dirs: tuple[Path, Path]) -> None:
    straight = mixture_loader(two_dirs, "0.6,0.4")
    batches = [next(straight) for _ in range(9)]
    cut = mixture_loader(two_dirs, "0.6,0.4")
    for _ in range(4):
        next(cut)
    state = json.loads(json.dumps(cut.state().to_dict()))  # through the checkpoint's JSON
    from efficient_train.data import LoaderState

    halves = [mixture_loader(two_dirs, "0.6,0.4", process_index=p, process_count=2) for p in range(2)]
    for half in halves:
        half.restore(LoaderState.from_dict(state))
    for expected in batches[4:]:
        got = [next(h) for h in halves]
        for name, value in expected.fields().items():
            np.testing.assert_array_equal(np.concatenate([getattr(g, name) for g in got]), value)


def test_mixture_weights_change_on_resume(two_dirs: tuple[Path, Path]) -> None:
    """New weights apply from the resumed step on; each source continues its own stream where it was."""
    first = mixture_loader(two_dirs, "0.7,0.3")
    for _ in range(600):  # past a block boundary (4096 samples)
        next(first)
    second = mixture_loader(two_dirs, "0.2,0.8")
    second.restore(first.state())
    samples = np.arange(600 * 8, 1600 * 8)
    source, _ = second.locate(samples)
    assert abs((source == 0).mean() - 0.2) < 0.01
    before = first.locate(np.arange(600 * 8))
    after = second.locate(samples)
    for s in (0, 1):
        used = np.concatenate([before[1][before[0] == s], after[1][after[0] == s]])
        np.testing.assert_array_equal(np.sort(used), np.arange(len(used)))  # no sample repeated or skipped
    assert second.state().mixture["start"] == 600 * 8


@pytest.mark.parametrize("overrides, message", [
    (dict(mixture="a:0.7,b"), r"^data\.mixture: entry 'b' must be DIR:WEIGHT with a weight > 0"),
    (dict(mixture="a:0.7,b:-1"), r"^data\.mixture: entry 'b:-1' must be DIR:WEIGHT"),
    (dict(mixture="/nonexistent:1"), r"^data\.mixture: '/nonexistent' does not exist"),
    (dict(source="jsonl", mixture="a:1"), r"^data\.mixture: mixes prepared directories; set data\.source=prepared"),
    (dict(), r"^data\.path: source 'prepared' reads one directory \(data\.path\) or a mixture"),
    (dict(source="tokens", tokenizer="/"), r"^data\.tokenizer: applies to the 'text', 'jsonl' and 'prepared'"),
])
def test_data_config_errors_name_the_field(overrides: dict, message: str) -> None:
    from efficient_train.data import check_data_config

    with pytest.raises(DataError, match=message):
        check_data_config(data_config(**overrides), 300)


# ----------------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efficient_train.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(1), cwd=ROOT, timeout=600)


def test_cli_prepare_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok", \n')
    for args, message in (
        (["--input", str(bad), "--format", "jsonl"], f"error: '{bad}' line 2: not valid JSON"),
        (["--input", str(bad), "--format", "csv"], "error: --format: 'csv' is not one of text, jsonl, parquet, chat"),
        (["--input", str(bad), "--tokenizer", str(tmp_path)], f"error: --tokenizer: '{tmp_path}' has no tokenizer.json"),
    ):
        result = cli("prepare", *args, "--output", str(tmp_path / "out"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and lines[-1].startswith(message), result.stderr
        assert "Traceback" not in result.stderr and lines[-1].count("error:") == 1
    result = cli("train", "--config.data.source=prepared", f"--config.data.mixture={tmp_path}:0.5,{bad}:x")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: data.mixture: entry '{bad}:x' must be DIR:WEIGHT with a "
                                                  "weight > 0, e.g. 'data/web:0.7,data/code:0.3'"]


@pytest.mark.slow
def test_cli_trains_on_a_mixture_and_changes_weights_on_resume(tok: Path, tmp_path: Path) -> None:
    for name in ("web", "code"):
        write_jsonl(tmp_path / f"{name}.jsonl", [f"{name} {t}" for t in TEXTS])
        result = cli("prepare", "--input", str(tmp_path / f"{name}.jsonl"), "--output", str(tmp_path / name),
                     "--tokenizer", str(tok), "--format", "jsonl", "--workers", "2")
        assert result.returncode == 0 and "train 120 documents" in result.stdout, result.stderr
    common = ["--workdir", str(tmp_path / "run"), "--config.data.source=prepared", f"--config.data.tokenizer={tok}",
              "--config.model.vocab_size=320", "--config.data.seq_len=32", "--config.train.log_every=2",
              "--config.train.batch_size=8",
              "--config.checkpoint.every=2"]
    mixture = f"--config.data.mixture={tmp_path / 'web'}:0.75,{tmp_path / 'code'}:0.25"
    result = cli("train", *common, mixture, "--config.train.steps=4")
    assert result.returncode == 0, result.stderr[-2000:]
    result = cli("train", *common, f"--config.data.mixture={tmp_path / 'web'}:0.1,{tmp_path / 'code'}:0.9",
                 "--config.train.steps=6")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    shares = [(r["step"], r["mixture/web"]) for r in records if "mixture/web" in r]
    assert [step for step, _ in shares] == [2, 4, 6]
    web_after_resume = (shares[2][1] * 6 * 8 - shares[1][1] * 4 * 8) / (2 * 8)
    assert shares[1][1] > 0.5 > web_after_resume  # the new weights took over from step 5 on
    for record in records:
        if "mixture/web" in record:
            assert record["mixture/web"] + record["mixture/code"] == pytest.approx(1.0)
