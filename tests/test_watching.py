"""Watching and checking a run: evaluation sets, the record stream's sinks (metrics.jsonl,
TensorBoard read back with TensorBoard's own reader, W&B's offline run file), the
profiler's trace on disk, and `efficient-train eval` on the saved checkpoint.

One watched run (ZeRO-3, data=4 x tensor=2, two micro-batches: evaluation must take the
training program's path) and the same run unwatched are shared by the slow tests below.
"""
from __future__ import annotations

import glob
import gzip
import json
import math
import os
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from efficient_train import Trainer, cli
from efficient_train.config import validate_fields
from efficient_train.data.eval_sets import EvalSetSpec, build_eval_set, parse_eval_sets
from efficient_train.data.prepare import prepare
from efficient_train.data.prepared import PreparedSource
from efficient_train.errors import InputError
from tests.support.data_setup import make_tokenizer
from tests.support.zero_setup import small_config

STEPS = 6
WORDS = "the quick brown fox jumps over a lazy dog while packing keeps documents apart and tokens flow".split()


def _documents(directory: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(40, 120)))))
    return directory


def _config(tmp: Path, prepared: Path, watched: bool):
    config = small_config(**{
        "model.vocab_size": 256, "data.source": "prepared", "data.path": str(prepared), "train.steps": STEPS,
        "train.log_every": 2, "train.grad_accum": 2, "mesh.data": 4, "mesh.tensor": 2, "zero_stage": 3,
        "tracker.tensorboard": watched,
    })
    config.workdir = str(tmp / ("watched" if watched else "plain"))
    if watched:
        config.eval.update(sets=f"validation,raw=text:{tmp / 'heldout'}", every=4, steps=2)
        config.profile.update(start_step=2, steps=2)
        if _has_wandb():
            config.tracker.wandb.update(project="efficient-train-tests", mode="offline")
    return config


def _has_wandb() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("watching")
    prepare([str(_documents(tmp / "docs", 60, 0) / "*.txt")], tmp / "prepared", validation_fraction=0.25,
            progress=False)
    _documents(tmp / "heldout", 8, 1)
    os.environ["WANDB_SILENT"] = "true"
    out = {}
    for watched in (True, False):
        config = _config(tmp, tmp / "prepared", watched)
        trainer = Trainer(config)
        trainer.fit()
        out[watched] = (config, trainer)
    return tmp, out


def _records(config) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(config.workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_evaluation_leaves_training_as_it_was(runs):
    """Evaluating every few steps (own loaders, parameters read, never donated) changes no
    training batch: every logged loss and the final parameters are bitwise those of the run
    without evaluation, and the loader stands at the same place."""
    _, out = runs
    (watched, trained), (plain, reference) = out[True], out[False]
    losses = lambda config: [(r["step"], r["loss"]) for r in _records(config) if "loss" in r]
    assert losses(watched) == losses(plain) and len(losses(plain)) == STEPS // 2
    assert trained.loader.state() == reference.loader.state()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        trained.state.params, reference.state.params)
    assert all(jax.tree.leaves(same))


@pytest.mark.slow
def test_evaluation_is_compiled_once_on_the_training_mesh_and_shardings(runs):
    """The evaluator holds one ahead-of-time compiled program (a `Compiled` is never recompiled:
    other shardings are refused, not retraced) whose inputs are the train step's parameter and
    batch shardings on the training mesh; ZeRO-3 gathers the parameter shards inside it."""
    _, out = runs
    _, trainer = out[True]
    compiled = trainer.evaluator.compiled
    assert isinstance(compiled, jax.stages.Compiled)
    (eval_params, eval_frozen, eval_batch), _ = compiled.input_shardings
    (train_state, train_batch), _ = trainer.compiled.input_shardings
    assert jax.tree.leaves(eval_frozen) == []  # no LoRA base in this run
    assert jax.tree.leaves(eval_params) == jax.tree.leaves(train_state.params)
    assert jax.tree.leaves(eval_batch) == jax.tree.leaves(train_batch)
    assert all(s.mesh == trainer.mesh for s in jax.tree.leaves(eval_params))
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(eval_params))
    assert "all-gather" in compiled.as_text()


@pytest.mark.slow
def test_a_resumed_run_with_evaluation_trains_as_one_without(runs):
    """Evaluating every 2 steps, stopped by SIGTERM after step 3 (saved with the loader before
    batch 4) and resumed by a new trainer: the losses at every logged step and the final
    parameters are bitwise those of the uninterrupted run without evaluation, and the final
    evaluation is the watched run's. With wandb installed, the resumed trainer continues the first
    one's W&B run (same run id) from the step after the checkpoint."""
    import signal

    from efficient_train.train.trainer import Hook

    tmp, out = runs
    (plain, reference), (watched, _) = out[False], out[True]
    config = _config(tmp, tmp / "prepared", watched=False)
    config.workdir = str(tmp / "resumed")
    config.eval.update(sets="validation", every=2, steps=2)
    if _has_wandb():
        config.tracker.wandb.update(project="efficient-train-tests", mode="offline")
    terminate = Hook(every=3, fn=lambda trainer, step, record: os.kill(os.getpid(), signal.SIGTERM))
    first = Trainer(config, hooks=[terminate])
    first.fit()
    assert first.stop_reason == "SIGTERM" and int(first.state.step) == 3
    second = Trainer(config)
    assert int(second.state.step) == 3
    second.fit()
    assert second.stop_reason is None
    losses = lambda c: {r["step"]: r["loss"] for r in _records(c) if "loss" in r}
    resumed = losses(config)
    assert {step: resumed[step] for step in losses(plain)} == losses(plain)
    assert [r["step"] for r in _records(config) if "eval_time_s" in r] == [2, 4, 6]
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        second.state.params, reference.state.params)
    assert all(jax.tree.leaves(same))
    final = lambda c: [r for r in _records(c) if "eval_time_s" in r][-1]["eval/validation/loss"]
    assert final(config) == final(watched)
    if _has_wandb():
        runs_on_disk = sorted(glob.glob(os.path.join(config.workdir, "wandb", "offline-run-*")))
        assert len(runs_on_disk) == 2
        assert len({path.rsplit("-", 1)[1] for path in runs_on_disk}) == 1  # one W&B run id, continued
        histories = [_wandb_records(glob.glob(os.path.join(path, "run-*.wandb"))[0])[0] for path in runs_on_disk]
        assert [step for step, _ in histories[0]] == [2, 3]  # the log step, then the record at the stop
        assert [step for step, _ in histories[1]] == [4, 6]


@pytest.mark.slow
def test_evaluation_records_match_a_plain_forward_pass(runs):
    """At step 4 (eval.every) and at the end: each set's loss is the weighted next-token loss of
    its first eval.steps batches under the parameters of that step, computed here by the
    unsharded model on one device; perplexity and bits per byte follow from it (byte-level data:
    one byte per token)."""
    from efficient_train.train.loss import next_token_loss
    from efficient_train.train.state import bind

    tmp, out = runs
    config, trainer = out[True]
    evals = [r for r in _records(config) if "eval_time_s" in r]
    assert [r["step"] for r in evals] == [4, STEPS]
    final = evals[-1]
    step_def = trainer.setup.step_def
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), trainer.state.params)
    model = bind(step_def.graphdef, step_def.param_structure, params, step_def.rest)
    loss_fn = jax.jit(next_token_loss)
    for spec in parse_eval_sets(config.eval.sets):
        eval_set = build_eval_set(spec, config.data, vocab_size=256, global_batch_size=16, process_index=0,
                                  process_count=1, column_order=None, cache_dir=None)
        sums = [loss_fn(model, jax.tree.map(np.asarray, eval_set.batch(i))) for i in range(2)]
        total, weight = (float(sum(float(s[k]) for s in sums)) for k in (0, 1))
        loss = final[f"eval/{spec.name}/loss"]
        assert loss == pytest.approx(total / weight, rel=1e-5) and final[f"eval/{spec.name}/tokens"] == weight
        assert final[f"eval/{spec.name}/perplexity"] == pytest.approx(math.exp(loss))
        assert final[f"eval/{spec.name}/bits_per_byte"] == pytest.approx(loss / math.log(2))
    assert evals[0]["eval/validation/loss"] > final["eval/validation/loss"]  # it learns


@pytest.mark.slow
def test_evaluation_under_ring_sequence_parallelism_is_the_plain_loss(runs):
    """Ring attention over sequence=2 (the eval sets' rows in zigzag order, as training's) with
    tensor=2 and ZeRO-3: each set's evaluated loss is the unsharded model's on the rows in their
    natural order."""
    from efficient_train.train.loss import next_token_loss
    from efficient_train.train.state import bind

    tmp, _ = runs
    config = _config(tmp, tmp / "prepared", watched=False)
    config.mesh.update(data=2, sequence=2, tensor=2)
    config.sequence_parallel.mode = "ring"
    config.eval.update(sets=f"validation,raw=text:{tmp / 'heldout'}", steps=2)
    trainer = Trainer(config)
    record = trainer.evaluator.run(trainer.state.params, 0)
    step_def = trainer.setup.step_def
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), trainer.state.params)
    model = bind(step_def.graphdef, step_def.param_structure, params, step_def.rest)
    for spec in parse_eval_sets(config.eval.sets):
        eval_set = build_eval_set(spec, config.data, vocab_size=256, global_batch_size=16, process_index=0,
                                  process_count=1, column_order=None, cache_dir=None)
        sums = [jax.jit(next_token_loss)(model, jax.tree.map(np.asarray, eval_set.batch(i))) for i in range(2)]
        total, weight = (float(sum(float(s[k]) for s in sums)) for k in (0, 1))
        assert record[f"eval/{spec.name}/loss"] == pytest.approx(total / weight, rel=1e-5)
        assert record[f"eval/{spec.name}/tokens"] == weight


@pytest.mark.slow
def test_eval_command_on_the_checkpoint_equals_the_run(runs, capsys):
    """`efficient-train eval --checkpoint` on the run's final step, with the run's mesh, sets and
    batch, prints the record the run wrote at that step."""
    tmp, out = runs
    config, _ = out[True]
    final = [r for r in _records(config) if "eval_time_s" in r][-1]
    capsys.readouterr()
    code = cli.main(["eval", "--checkpoint", os.path.join(config.workdir, "checkpoints"), "--data", config.eval.sets,
                     "--steps", "2", "--config.data.source=prepared", f"--config.data.path={config.data.path}",
                     "--config.data.seq_len=32", "--config.mesh.data=4", "--config.mesh.tensor=2",
                     "--config.zero_stage=3", "--config.train.grad_accum=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0].startswith(f"eval step {STEPS:>6} | validation loss")
    record = json.loads(lines[-1])
    assert record["step"] == STEPS and record["checkpoint"].endswith(f"checkpoints/{STEPS}")
    for key, value in final.items():
        if key.startswith("eval/"):
            assert record[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
def test_tensorboard_holds_the_records_of_metrics_jsonl(runs):
    """TensorBoard's own reader finds every scalar of every metrics.jsonl record (training and
    evaluation) at its step, and the startup record as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = runs
    config, _ = out[True]
    records = _records(config)
    accumulator = EventAccumulator(os.path.join(config.workdir, "tensorboard"))
    accumulator.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if "event" in record:
            continue
        for key, value in record.items():
            if key != "step" and value is not None:
                expected.setdefault(key, []).append((record["step"], value))
    assert set(accumulator.Tags()["scalars"]) == set(expected)
    assert {"loss", "eval/validation/loss", "eval/raw/bits_per_byte"} <= set(expected)
    for tag, points in expected.items():
        read = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in points], tag
        assert np.allclose([v for _, v in read], [v for _, v in points], rtol=1e-6), tag  # stored as float32
    startup = accumulator.Tensors("startup/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f'"num_params": {records[0]["num_params"]}' in startup


@pytest.mark.slow
def test_wandb_offline_run_holds_the_records_of_metrics_jsonl(runs):
    """W&B in offline mode (no network): the run file's history rows hold the scalar records at
    their steps, and its config is the startup record."""
    if not _has_wandb():
        pytest.skip("wandb is not installed (pip install 'efficient-train[wandb]')")
    _, out = runs
    config, _ = out[True]
    files = glob.glob(os.path.join(config.workdir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    history, config_items = _wandb_records(files[0])
    expected: dict[int, dict] = {}  # W&B keeps one row per step: a training and an eval record at a step share it
    for record in _records(config):
        if "event" not in record:
            expected.setdefault(record["step"], {}).update(
                {k: v for k, v in record.items() if k != "step" and v is not None})
    assert [step for step, _ in history] == sorted(expected) == [2, 4, 6]
    for step, row in history:
        assert set(row) == set(expected[step])
        assert all(row[k] == pytest.approx(expected[step][k], rel=1e-12) for k in row)
    assert config_items["num_params"] == _records(config)[0]["num_params"]


def _wandb_records(path: str) -> tuple[list[tuple[int, dict]], dict]:
    """(history rows as (step, values), config) read from a .wandb file: a 7-byte header, then
    LevelDB-log records (crc32, length, type; 32 KiB blocks) of W&B's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    payloads, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # full, last
            payloads.append(pending)
            pending = b""
    history, config = [], {}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            history.append((step, {k: v for k, v in items.items() if not k.startswith("_")}))
        elif kind == "config":
            for item in record.config.update:
                value = json.loads(item.value_json)
                config[item.key] = value.get("value", value) if isinstance(value, dict) else value
    return history, config


@pytest.mark.slow
def test_profile_trace_of_the_window_is_on_disk(runs):
    """profile.start_step=2, steps=2: one trace under <workdir>/profile, in TensorBoard's profile
    plugin layout (xplane.pb) and as a Perfetto trace whose `train` annotations are steps 2 and 3."""
    _, out = runs
    config, _ = out[True]
    runs_dirs = glob.glob(os.path.join(config.workdir, "profile", "plugins", "profile", "*"))
    assert len(runs_dirs) == 1
    assert glob.glob(os.path.join(runs_dirs[0], "*.xplane.pb"))
    with gzip.open(os.path.join(runs_dirs[0], "perfetto_trace.json.gz")) as f:
        events = json.load(f)["traceEvents"]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e)
    assert steps == [2, 3]
    assert not os.path.exists(os.path.join(out[False][0].workdir, "profile"))


def test_eval_sets_grammar_errors_name_the_field():
    config = small_config()
    for text, words in (("valid", "must be 'validation'"), ("a/b=x", "name 'a/b'"), ("a=x,a=text:y", "twice"),
                        ("a=text:", "names no path")):
        config.eval.sets = text
        with pytest.raises(InputError, match=f"^eval.sets: .*{words}"):
            validate_fields(config)
    config.eval.sets = ""
    config.eval.every = 5
    with pytest.raises(InputError, match="^eval.every: 5 evaluates no set"):
        validate_fields(config)
    assert parse_eval_sets(" validation , web=data/web, code=jsonl:c.jsonl, held=d:x:train") == [
        EvalSetSpec("validation", "prepared", ""), EvalSetSpec("web", "prepared", "data/web"),
        EvalSetSpec("code", "jsonl", "c.jsonl"), EvalSetSpec("held", "prepared", "d:x", "train")]


def test_eval_set_is_read_once_in_order_with_rows_past_its_end_weightless(tmp_path):
    """A set of 5 windows in batches of 4 rows: batch 1 holds window 4 and three rows that would
    wrap to the start; those weigh nothing, so the set counts each token once."""
    (tmp_path / "a.txt").write_bytes(bytes(range(33, 33 + 81)))  # 81 bytes: 5 windows of 16 (+1)
    config = small_config(**{"data.seq_len": 16})
    eval_set = build_eval_set(EvalSetSpec("a", "text", str(tmp_path / "a.txt")), config.data, vocab_size=256,
                              global_batch_size=4, process_index=0, process_count=1, column_order=None,
                              cache_dir=None)
    assert eval_set.num_batches(0) == 2 and eval_set.num_batches(1) == 1 and eval_set.num_batches(9) == 2
    first, second = eval_set.batch(0), eval_set.batch(1)
    assert first.inputs[:, 0].tolist() == [33, 49, 65, 81]  # in order, no shuffle
    assert second.inputs[0, 0] == 97 and second.loss_weights[0].sum() == 16
    assert second.loss_weights[1:].sum() == 0
    assert eval_set.bytes_per_token == 1.0


def test_prepare_counts_bytes_for_bits_per_byte(tmp_path):
    """With a BPE tokenizer the manifest counts each split's UTF-8 bytes, and the prepared source
    reports bytes per token from them (bits per byte = nats / ln 2 / bytes per token)."""
    tokenizer = make_tokenizer(tmp_path / "tok")
    texts = ["naïve café façade " * 3, "The quick brown fox.", "jumps over the lazy dog " * 2]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    manifest = prepare([str(tmp_path / "*.txt")], tmp_path / "out", tokenizer=str(tokenizer), progress=False)
    train = manifest["totals"]["train"]
    assert train["bytes"] == sum(len(t.encode()) for t in texts)
    assert PreparedSource(tmp_path / "out").bytes_per_token == pytest.approx(train["bytes"] / train["tokens"])
