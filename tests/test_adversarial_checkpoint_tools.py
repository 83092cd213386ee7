"""The checkpoint tools under hostile and damaged input (issue 13).

Each case runs the command line in-process and asserts its exit status, that stderr is
one `error:` line naming the file or field (never a traceback), and that nothing
outside the tool's destination changed (a hash of the directory tree around it).
Checkpoints are written directly by `write_checkpoint` from random parameters of a tiny
Llama, and Hugging Face directories by `write_safetensors`: no training, no torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

from efficient_train import cli
from efficient_train.checkpoint import metadata as metadata_module
from efficient_train.checkpoint import storage, writer
from efficient_train.checkpoint.manager import Checkpointer
from efficient_train.checkpoint.metadata import CheckpointReadError, metadata_path, read_metadata_file
from efficient_train.checkpoint.storage import read_leaf
from efficient_train.checkpoint.verify import verify_step
from efficient_train.checkpoint.writer import write_checkpoint
from efficient_train.models import ModelConfig
from efficient_train.tools.hf import config_to_hf
from efficient_train.tools.safetensors import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsDir,
    TensorSpec,
    tensor_maps,
    write_safetensors,
)
from tests.support.damage import flip_a_byte

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)
MESH = "data=2,tensor=2"


# ---------------------------------------------------------------------------------------------------------------
# helpers and fixtures


def tree_hash(root) -> str:
    """Every path under `root` with its kind and content (links by their target)."""
    digest = hashlib.sha256()
    for path, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(path, name)
            digest.update(os.path.relpath(full, root).encode() + b"\0")
            if os.path.islink(full):
                digest.update(b"L" + os.readlink(full).encode())
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    digest.update(b"F" + hashlib.sha256(f.read()).digest())
            else:
                digest.update(b"D")
    return digest.hexdigest()


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["checkpoint", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, *needles: str) -> str:
    """stderr is exactly one `error:` line (a RunError's starts a line of its own) naming `needles`."""
    assert "Traceback" not in err, err
    line = err.lstrip("\n")
    assert line.count("\n") == 1 and line.startswith("error: ") and line.endswith("\n"), repr(err)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def refused(capsys, code: int, *args: str, needles: tuple[str, ...], around) -> str:
    """Run the tool, expect exit `code` and one error line, and nothing changed under `around`."""
    before = tree_hash(around)
    got, _, err = run(capsys, *args)
    line = one_error_line(err, *needles)
    assert got == code, line
    assert tree_hash(around) == before, "the refused command changed files"
    return line


def random_params(seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [("params/" + m.leaf, rng.standard_normal(m.leaf_shape).astype(np.float32)) for m in tensor_maps(CFG)]


def write_hf_dir(directory, max_shard_bytes: int = 1 << 30, seed: int = 0) -> str:
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    maps = tensor_maps(CFG)
    plan = [TensorSpec(name, m.hf_shape, np.dtype(np.float32)) for m in maps for name in m.hf_names]
    tensors = ((spec.name, rng.standard_normal(spec.shape).astype(np.float32)) for spec in plan)
    write_safetensors(str(directory), plan, tensors, max_shard_bytes)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(CFG), f)
    return str(directory)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> str:
    """A params-only checkpoint directory holding steps 1 and 2; tests change copies of it."""
    directory = str(tmp_path_factory.mktemp("two_steps") / "ckpt")
    for step in (1, 2):
        write_checkpoint(directory, step, random_params(step), model=CFG.record(), optimizer=None)
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def sharded_hf_dir(tmp_path_factory) -> str:
    directory = write_hf_dir(tmp_path_factory.mktemp("hf_sharded") / "model", max_shard_bytes=20_000)
    assert os.path.exists(os.path.join(directory, INDEX_FILE))
    return directory


@pytest.fixture
def restore_env(monkeypatch):
    """`checkpoint convert` sets the simulated device count in os.environ: undo it after the test."""
    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


def copy_ckpt(two_steps: str, tmp_path) -> str:
    target = tmp_path / "ckpt"
    shutil.copytree(two_steps, target)
    return str(target)


def damage(step_dir: str) -> list[str]:
    """Flip one byte in the middle of the step's largest array file; the leaves verify now names."""
    flip_a_byte(step_dir)
    damaged = [problem.leaf for problem in verify_step(step_dir)]
    assert damaged
    return damaged


def edit_metadata(step_dir: str, change) -> None:
    path = metadata_path(step_dir)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    raw = change(raw)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f)


# ---------------------------------------------------------------------------------------------------------------
# 1. tools never launder damaged bytes


def test_convert_refuses_a_damaged_newest_step_then_converts_the_older_one(tmp_path, two_steps, capsys, restore_env):
    ckpt = copy_ckpt(two_steps, tmp_path)
    damaged = damage(os.path.join(ckpt, "2"))
    code, out, _ = run(capsys, "verify", ckpt)
    assert code == 1 and "DAMAGED: step 2" in out

    dst = tmp_path / "dst"
    line = refused(capsys, 1, "convert", ckpt, dst, "--mesh", MESH, around=tmp_path,
                   needles=("SRC: step 2", "is damaged, nothing was written to DST", *damaged,
                            f"older steps you can pass instead: {os.path.join(ckpt, '1')}"))
    assert not os.path.exists(dst), line

    # The older step converts, verifies and restores on the target mesh.
    code, out, err = run(capsys, "convert", os.path.join(ckpt, "1"), dst, "--mesh", MESH)
    assert code == 0, err
    assert run(capsys, "verify", dst)[:2] == (0, f"OK: step 1, all {len(random_params(1)) + 2} leaves match "
                                                 "their fingerprints\n")
    import jax

    from efficient_train.checkpoint.manager import leaf_paths
    from efficient_train.config import default_config
    from efficient_train.parallel.mesh import make_mesh
    from efficient_train.train.training_setup import build_setup

    config = default_config()
    config.model.update({k: v for k, v in dataclasses.asdict(CFG).items() if k in config.model})
    config.mesh.update(data=2, tensor=2)
    mesh = make_mesh({"replica": 1, "data": 2, "sequence": 1, "tensor": 2}, devices=jax.devices()[:4])
    setup = build_setup(config, mesh)
    state, _ = Checkpointer(str(dst), keep=1, keep_every=0, async_save=False).restore_step(
        1, setup.abstract_state, model=setup.model_config.record())
    restored = {"params/" + name: np.asarray(jax.device_get(leaf)) for name, leaf in leaf_paths(state.params)}
    for name, value in random_params(1):
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


@pytest.mark.parametrize("out_exists", [False, True], ids=["new_out_dir", "empty_out_dir"])
def test_export_hf_refuses_a_damaged_step_and_leaves_no_output(tmp_path, two_steps, capsys, out_exists):
    ckpt = copy_ckpt(two_steps, tmp_path)
    damaged = damage(os.path.join(ckpt, "2"))
    out = tmp_path / "exported" / "model"
    if out_exists:
        os.makedirs(out)
    before = tree_hash(tmp_path)
    code, _, err = run(capsys, "export-hf", ckpt, out)
    one_error_line(err, "CKPT: step 2", "nothing was written to OUT_DIR", *damaged, os.path.join(ckpt, "1"))
    assert code == 1
    assert tree_hash(tmp_path) == before  # no half-filled OUT_DIR, no parent left behind
    assert os.path.isdir(out) == out_exists and (not out_exists or os.listdir(out) == [])

    code, _, err = run(capsys, "export-hf", os.path.join(ckpt, "1"), out)
    assert code == 0, err
    exported = SafetensorsDir(str(out))
    expected = dict(random_params(1))["params/embed/embedding"]
    np.testing.assert_array_equal(exported.read("model.embed_tokens.weight"), expected)


@pytest.mark.parametrize("listed", ["none", "all_but_one"])
def test_verify_refuses_metadata_that_lists_fewer_leaves_than_are_stored(tmp_path, two_steps, capsys, listed):
    ckpt = copy_ckpt(two_steps, tmp_path)
    step_dir = os.path.join(ckpt, "2")
    dropped = "params/embed/embedding"
    edit_metadata(step_dir, lambda raw: dict(raw, leaves={} if listed == "none" else
                                             {k: v for k, v in raw["leaves"].items() if k != dropped}))
    code, out, _ = run(capsys, "verify", step_dir)
    assert code == 1 and "OK" not in out
    assert "NOT VERIFIED: step 2" in out and f"  {dropped}: stored but not listed in metadata.json" in out
    if listed == "none":
        assert "metadata.json lists 0 leaves" in out and "params/final_norm/scale: stored but not listed" in out


# ---------------------------------------------------------------------------------------------------------------
# 2. untrusted metadata never steers anything


HOSTILE_METADATA = {
    "a_list": (lambda raw: [raw], "metadata.json: is a list"),
    "string_step": (lambda raw: dict(raw, step="../../x"), "metadata.json: step: is a string '../../x'"),
    "negative_step": (lambda raw: dict(raw, step=-1), "metadata.json: step:"),
    "boolean_step": (lambda raw: dict(raw, step=True), "metadata.json: step: is a boolean"),
    "missing_step": (lambda raw: {k: v for k, v in raw.items() if k != "step"}, "metadata.json: step: missing"),
    "string_version": (lambda raw: dict(raw, format_version="1"), "metadata.json: format_version:"),
    "model_a_string": (lambda raw: dict(raw, model="llama"), "metadata.json: model: is a string"),
    "mesh_zero": (lambda raw: dict(raw, mesh={"data": 0}), "metadata.json: mesh.data:"),
    "zero_stage_7": (lambda raw: dict(raw, zero_stage=7), "metadata.json: zero_stage: is an integer 7"),
    "optimizer_a_list": (lambda raw: dict(raw, optimizer=[]), "metadata.json: optimizer: is a list"),
    "leaves_a_list": (lambda raw: dict(raw, leaves=[]), "metadata.json: leaves: is a list"),
    "leaf_name_escapes": (lambda raw: dict(raw, leaves={"../../etc/x": raw["leaves"]["step"]}),
                          "metadata.json: leaves: leaf name '../../etc/x'"),
    "huge_shape": (lambda raw: {**raw, "leaves": {**raw["leaves"], "step": {**raw["leaves"]["step"],
                                                                           "shape": [2**40, 2**40]}}},
                   "metadata.json: leaves.step.shape: [1099511627776, 1099511627776] holds"),
    "negative_shape": (lambda raw: {**raw, "leaves": {**raw["leaves"], "step": {**raw["leaves"]["step"],
                                                                               "shape": [-1]}}},
                       "metadata.json: leaves.step.shape:"),
    "unknown_dtype": (lambda raw: {**raw, "leaves": {**raw["leaves"], "step": {**raw["leaves"]["step"],
                                                                              "dtype": "object"}}},
                      "metadata.json: leaves.step.dtype: is a string 'object'; allowed: float32"),
    "int64_dtype": (lambda raw: {**raw, "leaves": {**raw["leaves"], "step": {**raw["leaves"]["step"],
                                                                            "dtype": "int64"}}},
                    "metadata.json: leaves.step.dtype:"),
    "fingerprint_a_number": (lambda raw: {**raw, "leaves": {**raw["leaves"], "step": {**raw["leaves"]["step"],
                                                                                     "fingerprint": 7}}},
                             "metadata.json: leaves.step.fingerprint:"),
}


@pytest.mark.parametrize("case", list(HOSTILE_METADATA))
def test_hostile_metadata_is_one_line_for_every_reader(tmp_path, two_steps, capsys, case):
    change, message = HOSTILE_METADATA[case]
    ckpt = copy_ckpt(two_steps, tmp_path)
    edit_metadata(os.path.join(ckpt, "2"), change)
    for tool in ("inspect", "verify"):
        refused(capsys, 2, tool, ckpt, needles=(message,), around=tmp_path)
    refused(capsys, 2, "export-hf", ckpt, tmp_path / "out", needles=(message,), around=tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "32", "model.hidden_size: is '32'; allowed: an integer"),
    ("rope_theta", "fast", "model.rope_theta: is 'fast'; allowed: a number"),
    ("tie_embeddings", 1, "model.tie_embeddings: is 1; allowed: true or false"),
    ("num_heads", 0, "model.num_heads must be a positive integer"),
    ("flavour", "x", "unknown model config keys: ['flavour']"),
])
def test_a_model_field_of_the_wrong_type_is_one_line(tmp_path, two_steps, capsys, restore_env, field, value, message):
    ckpt = copy_ckpt(two_steps, tmp_path)
    edit_metadata(os.path.join(ckpt, "2"), lambda raw: dict(raw, model={**raw["model"], field: value}))
    refused(capsys, 2, "export-hf", ckpt, tmp_path / "out", needles=("metadata.json: model", message),
            around=tmp_path)
    refused(capsys, 2, "convert", ckpt, tmp_path / "dst", "--mesh", MESH, needles=("metadata.json: model", message),
            around=tmp_path)


@pytest.mark.parametrize("step", ["../victim", "ABSOLUTE", "2/../../victim", 2.5])
def test_a_hostile_step_never_steers_convert_outside_dst(tmp_path, two_steps, capsys, restore_env, step):
    """Before: DST/<step> was built from the string, so convert wrote (and rmtree'd) outside DST."""
    ckpt = copy_ckpt(two_steps, tmp_path)
    victim = tmp_path / "victim"
    os.makedirs(victim / "keep")
    (victim / "keep" / "precious.txt").write_text("do not delete")
    step = str(victim) if step == "ABSOLUTE" else step
    edit_metadata(os.path.join(ckpt, "2"), lambda raw: dict(raw, step=step))
    before = tree_hash(victim)
    refused(capsys, 2, "convert", ckpt, tmp_path / "dst", "--mesh", MESH, needles=("metadata.json: step: is a",),
            around=tmp_path)
    assert tree_hash(victim) == before and not os.path.exists(tmp_path / "dst")


# ---------------------------------------------------------------------------------------------------------------
# 3. import-hf and convert never write beside existing steps


def test_import_hf_refuses_a_directory_that_holds_steps(tmp_path, two_steps, hf_dir, capsys):
    ckpt = copy_ckpt(two_steps, tmp_path)
    refused(capsys, 2, "import-hf", hf_dir, ckpt, needles=(f"OUT: {ckpt} already exists and holds step(s) 1, 2",),
            around=tmp_path)
    # An existing directory without steps is fine.
    os.makedirs(tmp_path / "empty")
    code, out, err = run(capsys, "import-hf", hf_dir, tmp_path / "empty")
    assert code == 0 and "step 0" in out, err
    assert verify_step(str(tmp_path / "empty" / "0")) == []


def test_convert_refuses_a_dst_that_holds_steps(tmp_path, two_steps, capsys, restore_env):
    ckpt = copy_ckpt(two_steps, tmp_path)
    other = tmp_path / "other"
    write_checkpoint(str(other), 7, random_params(7), model=CFG.record(), optimizer=None)
    refused(capsys, 2, "convert", ckpt, other, "--mesh", MESH, needles=("DST:", "holds step(s) 7"), around=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 4. durable, clean writes


def test_writer_fsyncs_every_file_and_directory_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    monkeypatch.setattr(writer.os, "rename", rename)
    directory = tmp_path / "new" / "ckpt"
    step_dir = write_checkpoint(str(directory), 3, random_params(0), model=CFG.record(), optimizer=None)
    renamed = events.index(("rename", step_dir))
    staging = os.path.join(str(directory), ".writing-3", "3")
    staged = {os.path.relpath(path, staging) for op, path in events[:renamed] if op == "fsync"}
    on_disk = {os.path.relpath(os.path.join(root, name), step_dir)
               for root, dirs, files in os.walk(step_dir) for name in dirs + files} | {"."}
    assert on_disk <= staged  # every file and directory of the step, before it is listed
    after = [path for op, path in events[renamed + 1:] if op == "fsync"]
    assert after == [str(directory), str(tmp_path / "new"), str(tmp_path)]  # the rename, and the dirs we made
    assert verify_step(step_dir) == []


def test_writer_leaves_nothing_behind_when_its_source_fails(tmp_path):
    def leaves():
        yield from random_params(0)[:3]
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        write_checkpoint(str(tmp_path / "made" / "ckpt"), 1, leaves(), model={}, optimizer=None)
    assert os.listdir(tmp_path) == []
    os.makedirs(tmp_path / "kept")
    with pytest.raises(RuntimeError):
        write_checkpoint(str(tmp_path / "kept"), 1, leaves(), model={}, optimizer=None)
    assert os.listdir(tmp_path / "kept") == []


# ---------------------------------------------------------------------------------------------------------------
# 5. Hugging Face input, one line each


def _corrupt_safetensors(path: str, case: str) -> None:
    with open(path, "rb") as f:
        content = f.read()
    (length,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8:8 + length])
    data = content[8 + length:]
    names = [name for name in header if name != "__metadata__"]

    def rewrite(new_header: dict, new_data: bytes = data) -> bytes:
        text = json.dumps(new_header).encode()
        return struct.pack("<Q", len(text)) + text + new_data

    if case == "truncated":
        content = content[:8 + length + len(data) // 2]
    elif case == "shorter_than_8":
        content = content[:5]
    elif case == "header_length_beyond_size":
        content = struct.pack("<Q", len(content) * 2) + content[8:]
    elif case == "header_not_json":
        content = struct.pack("<Q", 4) + b"{{{{" + data
    elif case == "header_a_list":
        content = rewrite([1, 2])
    elif case == "entry_without_dtype":
        header[names[0]].pop("dtype")
        content = rewrite(header)
    elif case == "unknown_dtype":
        header[names[0]]["dtype"] = "I64"
        content = rewrite(header)
    elif case == "offsets_past_end":
        begin, end = header[names[-1]]["data_offsets"]
        header[names[-1]]["data_offsets"] = [begin + len(data), end + len(data)]
        content = rewrite(header)
    elif case == "overlapping":  # two tensors of one size share the bytes of the first
        first, second = sorted((n for n in names if header[n]["shape"] == header[names[0]]["shape"]),
                               key=lambda n: header[n]["data_offsets"])[:2]
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
        content = rewrite(header)
    elif case == "offsets_a_string":
        header[names[0]]["data_offsets"] = "0-4"
        content = rewrite(header)
    with open(path, "wb") as f:
        f.write(content)


@pytest.mark.parametrize("case,needle", [
    ("truncated", "the file is truncated"),
    ("shorter_than_8", "truncated: 5 bytes"),
    ("header_length_beyond_size", "is beyond the file size"),
    ("header_not_json", "header is not valid JSON"),
    ("header_a_list", "header is list"),
    ("entry_without_dtype", ": dtype missing from its header entry"),
    ("unknown_dtype", ": dtype 'I64' is not supported; allowed: F64, F32, F16, BF16"),
    ("offsets_past_end", "run past the end of the file"),
    ("overlapping", "overlap those of"),
    ("offsets_a_string", "data_offsets '0-4' is not allowed"),
])
def test_bad_safetensors_files_are_one_line(tmp_path, hf_dir, capsys, case, needle):
    shutil.copytree(hf_dir, tmp_path / "hf")
    _corrupt_safetensors(str(tmp_path / "hf" / SINGLE_FILE), case)
    refused(capsys, 2, "import-hf", tmp_path / "hf", tmp_path / "out", needles=(SINGLE_FILE, needle), around=tmp_path)


@pytest.mark.parametrize("content,needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "is list [1, 2]; allowed: an object with a weight_map"),
    (b'{"metadata": {}}', "weight_map: is missing"),
    (b'{"weight_map": ["model.safetensors"]}', "weight_map: is list"),
    (b'{"weight_map": {"model.norm.weight": 3}}', "weight_map: file 3 is not allowed"),
])
def test_bad_index_json_is_one_line(tmp_path, sharded_hf_dir, capsys, content, needle):
    shutil.copytree(sharded_hf_dir, tmp_path / "hf")
    (tmp_path / "hf" / INDEX_FILE).write_bytes(content)
    refused(capsys, 2, "import-hf", tmp_path / "hf", tmp_path / "out", needles=(INDEX_FILE, needle), around=tmp_path)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink_outside"])
def test_index_naming_a_file_outside_the_model_directory_is_refused(tmp_path, sharded_hf_dir, capsys, where):
    shutil.copytree(sharded_hf_dir, tmp_path / "hf")
    index_path = tmp_path / "hf" / INDEX_FILE
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    shutil.move(tmp_path / "hf" / shard, tmp_path / "outside.safetensors")  # a real shard, moved out
    name = {"parent": "../outside.safetensors", "absolute": str(tmp_path / "outside.safetensors"),
            "symlink_outside": shard}[where]
    if where == "symlink_outside":
        os.symlink(tmp_path / "outside.safetensors", tmp_path / "hf" / shard)
    index["weight_map"] = {tensor: (name if file == shard else file) for tensor, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    needle = "outside the model directory" if where == "symlink_outside" else f"file {name!r} is not allowed"
    refused(capsys, 2, "import-hf", tmp_path / "hf", tmp_path / "out", needles=(INDEX_FILE, needle), around=tmp_path)


def test_a_hugging_face_cache_snapshot_linking_into_blobs_imports(tmp_path, sharded_hf_dir, capsys):
    """The HF cache keeps a snapshot's files as links to ../../blobs: those are inside the model."""
    repo = tmp_path / "models--tiny"
    snapshot = repo / "snapshots" / "abc123"
    os.makedirs(repo / "blobs")
    os.makedirs(snapshot)
    for name in os.listdir(sharded_hf_dir):
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        shutil.copy(os.path.join(sharded_hf_dir, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / name)
    code, _, err = run(capsys, "import-hf", snapshot, tmp_path / "out")
    assert code == 0, err


@pytest.mark.parametrize("change,needle", [
    (lambda c: [c], "config.json: is a list; allowed: a JSON object"),
    (lambda c: dict(c, rope_scaling="linear"), "config.json: rope_scaling='linear' is not supported; allowed: null"),
    (lambda c: dict(c, rope_parameters="default"), "config.json: rope_parameters='default' is not supported"),
    (lambda c: dict(c, num_attention_heads=0), "config.json: num_attention_heads=0 is not supported; allowed: a "
                                               "positive integer"),
    (lambda c: dict(c, num_attention_heads=True), "config.json: num_attention_heads=True is not supported"),
    (lambda c: dict(c, rope_theta="fast", rope_parameters=None), "config.json: rope_theta='fast' is not supported; "
                                                                 "allowed: a positive number"),
    (lambda c: dict(c, rope_parameters={"rope_type": "default", "rope_theta": "fast"}),
     "config.json: rope_parameters.rope_theta='fast'"),
    (lambda c: dict(c, rms_norm_eps=-1.0), "config.json: rms_norm_eps=-1.0"),
    (lambda c: dict(c, tie_word_embeddings="yes"), "config.json: tie_word_embeddings='yes'"),
    (lambda c: dict(c, head_dim="8"), "config.json: head_dim='8'"),
], ids=["a_list", "rope_scaling_string", "rope_parameters_string", "zero_heads", "boolean_heads", "rope_theta_string",
        "rope_parameters_theta_string", "negative_eps", "tie_string", "head_dim_string"])
def test_bad_config_json_is_one_line(tmp_path, hf_dir, capsys, change, needle):
    shutil.copytree(hf_dir, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    refused(capsys, 2, "import-hf", tmp_path / "hf", tmp_path / "out", needles=(needle,), around=tmp_path)


def test_outputs_that_are_regular_files_are_refused(tmp_path, two_steps, hf_dir, capsys, restore_env):
    ckpt = copy_ckpt(two_steps, tmp_path)
    (tmp_path / "a_file").write_text("mine")
    target = tmp_path / "a_file"
    refused(capsys, 2, "convert", ckpt, target, "--mesh", MESH, needles=(f"DST: '{target}' is a file",),
            around=tmp_path)
    refused(capsys, 2, "export-hf", ckpt, target, needles=(f"OUT_DIR: '{target}' is a file",), around=tmp_path)
    refused(capsys, 2, "import-hf", hf_dir, target, needles=(f"OUT: '{target}' is a file",), around=tmp_path)
    refused(capsys, 2, "import-hf", hf_dir, target / "below", needles=("OUT:", "is a file, so"), around=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 6. what is not damage is never called damage


def test_read_errors_that_prove_nothing_are_reported_as_read_errors(tmp_path, two_steps, capsys, monkeypatch):
    ckpt = copy_ckpt(two_steps, tmp_path)
    real_open = storage.ts.open

    def denied(spec, *args, **kwargs):
        if "embed" in spec["kvstore"]["path"]:
            raise ValueError("PERMISSION_DENIED: Error opening file: Permission denied [source locations=...]")
        return real_open(spec, *args, **kwargs)

    monkeypatch.setattr(storage.ts, "open", denied)
    for args in (("verify", ckpt), ("export-hf", ckpt, tmp_path / "out")):
        line = refused(capsys, 1, *args, needles=("params/embed/embedding: cannot be read (PERMISSION_DENIED",
                                                  "says nothing about its bytes"), around=tmp_path)
        assert "damage" not in line.lower()

    def no_memory(spec, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(storage.ts, "open", no_memory)
    line = refused(capsys, 1, "verify", ckpt, needles=("out of host memory",), around=tmp_path)
    assert "damage" not in line.lower()
    monkeypatch.setattr(storage.ts, "open", real_open)

    def eacces(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(metadata_module, "open", eacces, raising=False)
    with pytest.raises(CheckpointReadError, match="metadata.json: cannot be read"):
        read_metadata_file(metadata_path(os.path.join(ckpt, "2")))
    line = refused(capsys, 1, "inspect", ckpt, needles=("metadata.json: cannot be read (Permission denied)",),
                   around=tmp_path)
    assert "damage" not in line.lower()
    monkeypatch.undo()

    # What does prove damage still says so: metadata.json cut short, a leaf's bytes gone.
    path = metadata_path(os.path.join(ckpt, "2"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    refused(capsys, 1, "inspect", ckpt, needles=("metadata.json: not valid JSON",), around=tmp_path)
    assert read_leaf(os.path.join(ckpt, "1"), "params/embed/embedding").shape == (CFG.vocab_size, CFG.hidden_size)
