"""`metadata.json`: what a checkpoint holds, independent of the mesh it was saved from.

Written with the arrays, inside the same atomic step directory. The mesh and ZeRO stage
at save are recorded for reference only: restoring never reads them, it lays arrays
out for the current mesh. The model config is compared on restore (a mismatch is
refused with the differing fields named), and a format version newer than this code
understands is refused rather than guessed at.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from efficient_train.errors import InputError, RunError

FORMAT_VERSION = 1


class CheckpointError(InputError):
    """A checkpoint that cannot be used as asked, phrased as one line."""


class DamagedCheckpoint(RunError):
    """Proven damage: a step whose bytes do not match their fingerprints, or are unreadable
    or missing. Any other failure to read a step (I/O, memory, version) is not this."""


class CheckpointWriteError(RunError):
    """A save whose background write failed (disk full, I/O error): that step was never
    committed, and the steps before it are untouched."""


@dataclasses.dataclass(frozen=True)
class LeafRecord:
    shape: tuple[int, ...]
    dtype: str
    fingerprint: str


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

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["leaves"] = {path: dataclasses.asdict(record) for path, record in self.leaves.items()}
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "CheckpointMetadata":
        version = raw.get("format_version")
        if not isinstance(version, int):
            raise CheckpointError("metadata.json: format_version is missing or not an integer")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"metadata.json: format_version {version} is newer than this efficient-train understands "
                f"({FORMAT_VERSION}); upgrade efficient-train to read it"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(raw)
        if missing:
            raise CheckpointError(f"metadata.json: missing fields {', '.join(sorted(missing))}")
        leaves = {
            path: LeafRecord(tuple(r["shape"]), r["dtype"], r["fingerprint"]) for path, r in raw["leaves"].items()
        }
        return cls(**{name: raw[name] for name in fields if name != "leaves"}, leaves=leaves)


def check_model_matches(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint of another architecture; only the attention kernel may differ."""
    ignored = {"attention_impl", "norm_impl", "remat", "dtype"}  # how to compute, not what is stored
    differing = sorted(
        key for key in set(saved) | set(current) if key not in ignored and saved.get(key) != current.get(key)
    )
    if differing:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs config {current.get(k)!r}" for k in differing)
        raise CheckpointError(f"model config does not match the checkpoint ({detail})")
