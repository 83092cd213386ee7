"""One record stream, many sinks: `metrics.jsonl`, the console, TensorBoard, Weights & Biases.

The trainer writes each record once, to a `RecordStream`; every sink receives exactly
that record and shows it its own way, so the trackers hold what `metrics.jsonl` holds.
Adding a sink is one class with `write(record)` and `close()`. Records are of three
kinds, told apart by their keys:
- the startup record (`"event": "startup"`): the run's configuration and memory;
- an event (another `"event"`: preempted, data_exhausted) at a step;
- scalars at a step (no `"event"`): a training log step's, or an evaluation's
  (`eval/<set>/...`); values that are null (MFU on a CPU) are left out of the trackers.

Only process 0 writes (the trainer builds the sinks there alone). Tracker libraries are
imported when their sink is built: tensorboardX is a dependency of the package, wandb
an extra (`pip install efficient-train[wandb]`), asked for by `tracker.wandb.project`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Protocol

import ml_collections

from efficient_train.errors import InputError


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A scalar record's numeric values, without the step and nulls."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class RecordStream:
    """Sends every record to every sink; closes them all, even when one fails to close."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        failure: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except BaseException as error:  # noqa: BLE001 - close the others, then raise the first
                failure = failure or error
        if failure is not None:
            raise failure


class TensorBoardSink:
    """Event files in `<workdir>/tensorboard`: scalars by their record keys at their step, the
    startup record as text (`startup`), events as text (`events`). Flushed after every record."""

    def __init__(self, directory: str) -> None:
        from tensorboardX import SummaryWriter

        self.directory = directory
        self._writer = SummaryWriter(directory)

    def write(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "startup":
            self._writer.add_text("startup", _as_text(record), global_step=record.get("start_step", 0))
        elif event is not None:
            self._writer.add_text("events", _as_text(record), global_step=record.get("step", 0))
        else:
            for key, value in scalars(record).items():
                self._writer.add_scalar(key, value, global_step=record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run: the startup record as its config, scalars logged at their step
    (W&B keeps one history row per step, so a training and an evaluation record of the same
    step share a row), events in its summary (`event/<name>`). Mode `offline` writes
    `<workdir>/wandb` only, for `wandb sync` later.

    The run's id is kept in `<workdir>/wandb/run_id`; a run resumed from a checkpoint continues
    that W&B run (`resume="allow"`) rather than starting another. Steps the earlier run logged after
    its last checkpoint are logged again; resumption is bitwise, so W&B, which keeps the first row of
    a step, holds the same values either way."""

    def __init__(self, tracker: ml_collections.ConfigDict, workdir: str, *, resuming: bool = False) -> None:
        try:
            import wandb
        except ImportError:
            raise InputError("tracker.wandb.project: is set but wandb is not installed; pip install "
                             "'efficient-train[wandb]', or leave tracker.wandb.project empty") from None
        id_file = os.path.join(workdir, "wandb", "run_id")
        run_id = open(id_file).read().strip() if resuming and os.path.exists(id_file) else None
        self._run = wandb.init(project=tracker.project, entity=tracker.entity or None, name=tracker.name or None,
                               mode=tracker.mode, dir=workdir, settings=wandb.Settings(silent=True),
                               id=run_id, resume="allow" if run_id else None)
        os.makedirs(os.path.dirname(id_file), exist_ok=True)
        with open(id_file, "w") as handle:
            handle.write(self._run.id)

    def write(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "startup":
            self._run.config.update(record, allow_val_change=True)
        elif event is not None:
            self._run.summary[f"event/{event}"] = record
        else:
            self._run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()


def _as_text(record: dict[str, Any]) -> str:
    """A record as TensorBoard's markdown shows it: indented JSON in a code block."""
    return "```\n" + json.dumps(record, indent=1) + "\n```"


def tracker_sinks(config: ml_collections.ConfigDict, *, resuming: bool = False) -> list[Sink]:
    """The trackers `config.tracker` asks for (process 0 only builds them); `resuming`: the run
    continues from a checkpoint, so a W&B run continues too."""
    sinks: list[Sink] = []
    if config.tracker.tensorboard:
        sinks.append(TensorBoardSink(os.path.join(config.workdir, "tensorboard")))
    if config.tracker.wandb.project:
        sinks.append(WandbSink(config.tracker.wandb, config.workdir, resuming=resuming))
    return sinks
