"""`metadata.json`: what a checkpoint holds, independent of the mesh it was saved from.

Written with the arrays, inside the same atomic step directory. The mesh and ZeRO stage
at save are recorded for reference only: restoring never reads them, it lays arrays
out for the current mesh. The model config is compared on restore (a mismatch is
refused with the differing fields named), and a format version newer than this code
understands is refused rather than guessed at.

The file is untrusted input: a tool may be pointed at a checkpoint someone else wrote.
`CheckpointMetadata.from_json` checks every field's type and bounds before anything
uses it, and refuses a bad one with one line, `metadata.json: FIELD: what is wrong;
what is allowed` (CheckpointError, exit status 2). In particular `step` is a
non-negative integer (it names the step directory a tool writes, so a string like
"../x" never reaches a path), leaf names are slash-separated plain words, a leaf's
shape holds at most 2**48 elements, and its dtype is one this code writes and can
fingerprint (1, 2 and 4 byte types: `LEAF_DTYPES`; 8-byte types are never written).

What counts as damage (`DamagedCheckpoint`) is narrow: bytes proven wrong (a fingerprint
mismatch, a file that is missing or cut short, a metadata.json that is not JSON). A
step that cannot be read for another reason, such as a permission or I/O error or
running out of memory, is `CheckpointReadError`: the bytes may be fine, and calling
them damaged would invite deleting them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, TypeGuard

from efficient_train.errors import InputError, RunError
from efficient_train.parallel.axes import ZERO_STAGES

FORMAT_VERSION = 1
# The names inside a step directory, spelled once: <step>/state/ (Orbax's PyTree, with
# its tree description _METADATA) and <step>/metadata/metadata.json (ours).
STATE_ITEM = "state"
METADATA_ITEM = "metadata"
METADATA_FILE = "metadata.json"
ORBAX_TREE_FILE = "_METADATA"


def metadata_path(step_dir: str) -> str:
    return os.path.join(step_dir, METADATA_ITEM, METADATA_FILE)

# The dtypes a saved leaf may have: what the trainer and the tools write (fp32 and bf16
# weights and moments, uint8 codes, int32 counters) and the other types the fingerprint
# reads (words of 1, 2 or 4 bytes).
LEAF_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2",
               "int8", "uint8", "int16", "uint16", "int32", "uint32")
MAX_LEAF_ELEMENTS = 2**48
MAX_RANK = 32
MAX_STEP = 2**62
_LEAF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*")
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


# Optimizer fields that decide the shapes and dtypes of the stored optimizer state.
STATE_LAYOUT_FIELDS = ("state_format", "block_size", "min_quantized_size", "quantize_embeddings")
# Fields a metadata.json may lack (added after format version 1 was fixed; absent means null).
OPTIONAL_FIELDS = ("finetune",)

class CheckpointError(InputError):
    """A checkpoint that cannot be used as asked, phrased as one line."""


class DamagedCheckpoint(RunError):
    """Proven damage: a step whose bytes do not match their fingerprints, or are unreadable
    or missing. Any other failure to read a step (I/O, memory, version) is not this."""


class CheckpointReadError(RunError):
    """A step that could not be read for a reason that proves nothing about its bytes
    (permission denied, an I/O error, out of memory): never reported as damage."""


class CheckpointWriteError(RunError):
    """A save whose background write failed (disk full, I/O error): that step was never
    committed, and the steps before it are untouched."""


@dataclasses.dataclass(frozen=True)
class LeafRecord:
    shape: tuple[int, ...]
    dtype: str
    fingerprint: str


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message: its JSON type and a short repr."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    text = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {text[:40] + '...' if len(text) > 40 else text}"


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, wrong: str, allowed: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {field}: {wrong}; {allowed}")

    def int_in(self, raw: dict, field: str, low: int, high: int) -> int:
        value = raw[field]
        if not _is_int(value) or not low <= value <= high:
            raise self.fail(field, f"is {_kind(value)}", f"allowed: an integer from {low} to {high}")
        return value

    def json_object(self, raw: dict, field: str, nullable: bool) -> dict | None:
        """An object (its contents are checked by whoever uses them), or null where allowed."""
        value = raw[field]
        if value is None and nullable:
            return None
        if not isinstance(value, dict):
            raise self.fail(field, f"is {_kind(value)}", "allowed: an object" + (" or null" if nullable else ""))
        return value

    def mesh(self, value: Any) -> dict[str, int]:
        if not isinstance(value, dict):
            raise self.fail("mesh", f"is {_kind(value)}", "allowed: an object of axis name -> positive integer")
        for axis, size in value.items():
            if not _is_int(size) or not 1 <= size <= 2**31:
                raise self.fail(f"mesh.{axis}", f"is {_kind(size)}", "allowed: a positive integer")
        return value

    def leaf(self, name: Any, record: Any) -> LeafRecord:
        if not isinstance(name, str) or not _LEAF_NAME.fullmatch(name):
            raise self.fail("leaves", f"leaf name {name!r} is not allowed",
                            "allowed: words of letters, digits, '_', '.', '-' joined by '/'")
        field = f"leaves.{name}"
        if not isinstance(record, dict):
            raise self.fail(field, f"is {_kind(record)}", "allowed: an object with shape, dtype and fingerprint")
        missing = sorted({"shape", "dtype", "fingerprint"} - set(record))
        if missing:
            raise self.fail(field, f"{', '.join(missing)} missing", "allowed: an object with shape, dtype and fingerprint")
        shape = record["shape"]
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(_is_int(n) and 0 <= n <= MAX_LEAF_ELEMENTS for n in shape)):
            raise self.fail(f"{field}.shape", f"is {_kind(shape)}",
                            f"allowed: a list of at most {MAX_RANK} non-negative integers")
        elements = 1
        for n in shape:
            elements *= n
        if elements > MAX_LEAF_ELEMENTS:
            raise self.fail(f"{field}.shape", f"{shape} holds {elements} elements",
                            f"allowed: at most 2**48 ({MAX_LEAF_ELEMENTS})")
        if record["dtype"] not in LEAF_DTYPES:
            raise self.fail(f"{field}.dtype", f"is {_kind(record['dtype'])}", f"allowed: {', '.join(LEAF_DTYPES)}")
        fingerprint = record["fingerprint"]
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise self.fail(f"{field}.fingerprint", f"is {_kind(fingerprint)}", "allowed: 16 lowercase hex digits")
        return LeafRecord(tuple(shape), record["dtype"], fingerprint)


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    format_version: int
    step: int
    model: dict[str, Any]  # the model config fields (empty for a user's own module)
    mesh: dict[str, int]  # at save, reference only
    zero_stage: int  # at save, reference only
    optimizer: dict[str, Any] | None  # state format and its parameters; None: params only
    data: dict[str, Any] | None  # the loader's state, None for user-supplied data
    seed: int
    leaves: dict[str, LeafRecord]  # "params/blocks/attn/q/kernel" -> record
    # A LoRA run's: {"lora": {rank, alpha, dropout, targets}, "base": {path, step, fingerprint}};
    # None otherwise. Optional in the file (older checkpoints have none).
    finetune: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["leaves"] = {path: dataclasses.asdict(record) for path, record in self.leaves.items()}
        return out

    @classmethod
    def from_json(cls, raw: Any, source: str = METADATA_FILE) -> CheckpointMetadata:
        """Parse and check a loaded metadata.json; `source` names the file in errors."""
        check = _Checker(source)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: is {_kind(raw)}; allowed: a JSON object")
        version = raw.get("format_version")
        if not _is_int(version) or version < 1:
            raise check.fail("format_version", "is missing" if version is None else f"is {_kind(version)}",
                             "allowed: a positive integer")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version} is newer than this efficient-train understands "
                f"({FORMAT_VERSION}); upgrade efficient-train to read it"
            )
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in OPTIONAL_FIELDS]
        missing = [name for name in fields if name not in raw]
        if missing:
            raise check.fail(", ".join(missing), "missing", f"a checkpoint's metadata has {', '.join(fields)}")
        model = check.json_object(raw, "model", nullable=False) or {}  # never None: not nullable
        leaves = raw["leaves"]
        if not isinstance(leaves, dict):
            raise check.fail("leaves", f"is {_kind(leaves)}", "allowed: an object of leaf name -> record")
        return cls(
            format_version=version,
            step=check.int_in(raw, "step", 0, MAX_STEP),
            model=model,
            mesh=check.mesh(raw["mesh"]),
            zero_stage=check.int_in(raw, "zero_stage", ZERO_STAGES[0], ZERO_STAGES[-1]),
            optimizer=check.json_object(raw, "optimizer", nullable=True),
            data=check.json_object(raw, "data", nullable=True),
            seed=check.int_in(raw, "seed", -2**63, 2**64 - 1),
            leaves={name: check.leaf(name, record) for name, record in leaves.items()},
            finetune=_finetune(check, raw.get("finetune")),
        )


def _finetune(check: _Checker, value: Any) -> dict[str, Any] | None:
    """metadata.json's `finetune`: null, or an object with `lora` and `base` objects (base: path, step,
    fingerprint), which restore and the LoRA tools read."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("lora"), dict) or not isinstance(value.get("base"), dict):
        raise check.fail("finetune", f"is {_kind(value)}", "allowed: null or an object with lora and base objects")
    base = value["base"]
    if not isinstance(base.get("path"), str) or not _is_int(base.get("step")) \
            or not isinstance(base.get("fingerprint"), str) or not _FINGERPRINT.fullmatch(base["fingerprint"]):
        raise check.fail("finetune.base", f"is {_kind(base)}",
                         "allowed: an object with path (a string), step (an integer), fingerprint (16 hex digits)")
    lora = value["lora"]
    if not _is_int(lora.get("rank")) or lora["rank"] < 1 or not isinstance(lora.get("alpha"), (int, float)) \
            or isinstance(lora.get("alpha"), bool) or not isinstance(lora.get("targets"), list) \
            or not all(isinstance(t, str) for t in lora["targets"]):
        raise check.fail("finetune.lora", f"is {_kind(lora)}",
                         "allowed: an object with rank (a positive integer), alpha (a number), targets (names)")
    return value


def check_finetune_matches(step: int, saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse a step of another kind of run: LoRA vs not, other adapters, or another base."""
    if saved is None and current is None:
        return
    if saved is None:
        raise CheckpointError(f"step {step} is not a LoRA checkpoint, but finetune.lora.rank > 0: a LoRA run saves "
                              "into a checkpoint directory of its own; set checkpoint.dir (or workdir) to a new one")
    if current is None:
        raise CheckpointError(f"step {step} holds LoRA adapters (finetune.lora {saved['lora']}); resume it with the "
                              "same finetune.lora and finetune.base, or merge it first: efficient-train checkpoint "
                              "merge-lora SRC DST")
    # What the adapters mean: their shapes (rank, targets) and their scale (alpha / rank); dropout may change.
    meaning = ("rank", "alpha", "targets")
    changed = [f"{k}: saved {saved['lora'].get(k)!r}, this run {current['lora'].get(k)!r}" for k in meaning
               if saved["lora"].get(k) != current["lora"].get(k)]
    if changed:
        raise CheckpointError(f"finetune.lora: step {step} holds adapters of other settings ({'; '.join(changed)}); "
                              "set them back, or start a new run in another checkpoint.dir")
    old, new = saved["base"], current["base"]
    if old["fingerprint"] != new["fingerprint"]:
        raise CheckpointError(f"finetune.base: {new['path']} (fingerprint {new['fingerprint']}) is not the base step "
                              f"{step} was trained on ({old['path']}, fingerprint {old['fingerprint']}); point "
                              "finetune.base at that base, or start a new run in another checkpoint.dir")


def read_metadata_file(path: str) -> CheckpointMetadata:
    """Read and check one metadata.json.

    Missing, cut short or not JSON: DamagedCheckpoint (a committed step always has it,
    written by us as JSON). Unreadable for another reason (permissions, I/O, memory):
    CheckpointReadError. Well-formed JSON with a bad field: CheckpointError.
    """
    try:
        with open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing (every committed step has one)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory; allowed: the step's metadata file") from None
    except OSError as error:
        raise CheckpointReadError(f"{path}: cannot be read ({error.strerror or error}); "
                                  "this says nothing about its bytes") from None
    except MemoryError:
        raise CheckpointReadError(f"{path}: out of host memory reading it") from None
    try:
        raw = json.loads(content)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise DamagedCheckpoint(f"{path}: not valid JSON ({str(error).splitlines()[0][:120]})") from None
    return CheckpointMetadata.from_json(raw, source=path)


# The ModelConfig fields that say how to compute, not what is stored: a checkpoint restores,
# converts and exports under any value of them.
COMPUTE_FIELDS = frozenset({"attention_impl", "norm_impl", "moe_impl", "remat", "dtype", "matmul_precision"})


def check_model_matches(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint of another architecture; only the COMPUTE_FIELDS may differ."""
    differing = sorted(
        key for key in set(saved) | set(current) if key not in COMPUTE_FIELDS and saved.get(key) != current.get(key)
    )
    if differing:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs config {current.get(k)!r}" for k in differing)
        raise CheckpointError(f"model config does not match the checkpoint ({detail})")
