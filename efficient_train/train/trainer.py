"""Trainer: builds mesh, model, optimizer and data from a config, and runs the loop.

`Trainer(config)` trains the built-in Llama on the configured data source;
`Trainer(config, model=..., loss_fn=..., data=...)` trains the user's own Flax NNX
module under the same mesh and ZeRO stage. The step is compiled ahead of time, once,
so the startup record can report the compiled program's per-device memory before
the first step runs. Only process 0 writes metrics and the console.

Checkpoints: at start the newest verified step in `checkpoint.dir` (default
`<workdir>/checkpoints`) is restored onto this run's mesh, with the data loader's
position, so a restarted command continues where it stopped (a LoRA run also reads its
frozen base from `finetune.base`, train/finetune.py, and saves only its adapters). Saves run in the
background every `checkpoint.every` steps and at the end; SIGTERM (preemption) and
Ctrl-C (SIGINT; a second one aborts at once) make every process save at the same next
step boundary and return (`stop_reason` says which).

Nothing is lost when a run cannot go on:
- The work and checkpoint directories are locked (checkpoint/lock.py) while the
  trainer writes to them (construction, which may set damaged steps aside; fit(); a
  save() of the caller's until close()): another process is refused with one line
  naming the holder.
- A data problem found mid-run (DataError: a file truncated under the run, a token id
  beyond the vocabulary) saves the last good state, with the loader at the last good
  batch, then stops naming the file and position; an iterator of the user's that ends
  early ends the run cleanly with a save and a line saying so.
- A state that is not finite (the step reports `state_finite`) is never saved: the run
  stops naming the step and the newest saved step.
- A failed metrics write stops the run; `metrics.jsonl` keeps only whole lines.

Watching a run: every record (startup, log steps, evaluations, events) goes once to a
`RecordStream` (records.py) whose sinks are metrics.jsonl, the console, TensorBoard and
W&B. `eval.sets` are evaluated every `eval.every` steps and at the end (evaluation.py),
`profile.*` traces a window of steps (profiling.py), `sample.*` prints samples (samples.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from efficient_train.checkpoint import Checkpointer, CheckpointWriteError
from efficient_train.checkpoint.lock import DirectoryInUse, DirectoryLock
from efficient_train.config import ConfigError, validate
from efficient_train.data import Batch, DataError, DataReadError, LoaderState, build_loader
from efficient_train.errors import RunError
from efficient_train.parallel import layout
from efficient_train.parallel.mesh import make_mesh
from efficient_train.train.console import ConsoleProgress
from efficient_train.train.evaluation import Evaluator
from efficient_train.train.finetune import FinetuneBase, finetune_record, load_base
from efficient_train.train.memory import memory_record
from efficient_train.train.metrics import MetricsWriter, peak_tflops, throughput
from efficient_train.train.profiling import ProfileWindow
from efficient_train.train.records import RecordStream, tracker_sinks
from efficient_train.train.state import TrainState
from efficient_train.train.step import LossFn, build_train_step, compiler_options, place_batch
from efficient_train.train.training_setup import build_setup, init_state, lm_batch_shapes


@dataclasses.dataclass(frozen=True)
class Hook:
    """Calls `fn(trainer, step, metrics)` every `every` steps (after the step ran)."""

    every: int
    fn: Callable[[Trainer, int, dict], None]

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"Hook.every: {self.every!r} must be a positive integer (call fn every that many steps)")


# What the step reports for the trainer's guards, not for the metrics record.
GUARD_METRICS = ("loss_weight", "state_finite")


class NonFiniteState(RunError):
    """The update made parameters or optimizer state non-finite; such a state is never saved."""


class Trainer:
    """One training run: built from a config (the mesh, the data, the training setup, the compiled
    step, a restored or fresh state), then `fit()` runs the loop.

    The loop's duties are methods a reader finds by name: `_fetch_batch` and `_agree` (every
    process decides together whether to stop), `_stop_on_data` / `_stop_on_signal` (save, then
    say why), `_run_step`, `checkpointer.save_due` (the checkpointer's cadence) and `save`,
    `_log_due` / `_log_record` (the metrics record), `_eval_due` and `evaluator`, `profile` (the
    profiler's window), `records` (the stream every record goes to: file, console, trackers), hooks.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        model: Any = None,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        hooks: Sequence[Hook] = (),
    ) -> None:
        if model is not None and loss_fn is None:
            raise ValueError("loss_fn: required with a custom model; return a scalar mean or (sum, weight)")
        self.config = config
        mesh_shape = validate(config, jax.device_count(), check_paths=data is None)
        self.mesh = make_mesh(mesh_shape)
        self.hooks = list(hooks)
        self.is_main = jax.process_index() == 0
        global_batch = self._open_data(data, mesh_shape)
        self.setup = build_setup(
            config, self.mesh, model=model, loss_fn=loss_fn, shard_sequence=isinstance(global_batch, Batch)
        )
        checkpoint_dir = config.checkpoint.dir or os.path.join(config.workdir, "checkpoints")
        self._locks = [DirectoryLock(config.workdir, "an efficient-train run's work directory")]
        if os.path.abspath(checkpoint_dir) != os.path.abspath(config.workdir):
            self._locks.append(DirectoryLock(checkpoint_dir, "an efficient-train run's checkpoint directory"))
        self._custom_loss = loss_fn is not None
        self._last_saved_step: int | None = None
        self._last_metrics: dict[str, jax.Array] | None = None
        self._locked = False
        self._base: FinetuneBase | None = None  # a LoRA run's frozen base (set by _restore_or_init)
        self._lock_directories()  # restore may set damaged steps aside
        try:
            self.checkpointer = Checkpointer(
                checkpoint_dir,
                keep=config.checkpoint.keep,
                keep_every=config.checkpoint.keep_every,
                async_save=config.checkpoint.async_save,
                save_every=config.checkpoint.every,
            )
            self.state: TrainState = self._restore_or_init()
        finally:
            self._release_locks()  # fit() and save() take them again while they write
        self._step_fn = build_train_step(self.setup.step_def, self.setup.state_shardings, global_batch)
        self.abstract_batch = self.setup.abstract_batch(global_batch)
        self.compiled = self._step_fn.lower(self.state, self.abstract_batch).compile(
            compiler_options=compiler_options(self.setup.step_def))
        self.writer = MetricsWriter(config.workdir, enabled=self.is_main)
        self._peak_tflops = peak_tflops(jax.devices()[0])
        self._batch_shardings = jax.tree.map(lambda x: x.sharding, self.abstract_batch)
        # Tokens for a token batch; examples (the leading dim) for a user's batch.
        leading = jax.tree.leaves(global_batch)[0].shape
        self.tokens_per_step = leading[0] * leading[1] if isinstance(global_batch, Batch) else leading[0]
        self.evaluator = self._build_evaluator(data is None)
        self.profile = ProfileWindow(config.workdir, config.profile.start_step, config.profile.steps, self.is_main)
        if config.sample.every:
            self.hooks.append(self._sample_hook())
        if config.tracker.wandb.project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("tracker.wandb.project: is set but wandb is not installed; pip install "
                              "'efficient-train[wandb]', or leave tracker.wandb.project empty")
        self._stop_signal: str | None = None  # "SIGTERM" or "SIGINT" once one arrived
        self.stop_reason: str | None = None  # None: ran to train.steps; else why it stopped early

    def _open_data(self, data: Iterable[Any] | None, mesh_shape: dict[str, int]) -> Any:
        """Open the batch stream (the built-in loader, or a user's iterable, whose first batch is read
        now for its shapes) and return the global batch's shapes."""
        config = self.config
        self._first_batch: Any = None
        self.loader: Any  # the built-in data loader (a DataLoader or MixtureLoader), None with user data
        if data is not None:
            self.loader = None
            self._data: Iterator[Any] = iter(data)
            try:
                self._first_batch = next(self._data)
            except StopIteration:
                raise DataError("data: the iterator yielded no batch; give an iterable of batches (pytrees of "
                                "arrays whose first dimension is this process's share of the batch)") from None
            return self._global_shapes(self._first_batch)
        try:
            self.loader = build_loader(
                config.data,
                vocab_size=config.model.vocab_size,
                global_batch_size=config.train.batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                # Sequence parallelism's token layout (ring: zigzag), applied once, in the loader.
                column_order=layout.column_order(
                    config.sequence_parallel.mode, config.data.seq_len, mesh_shape["sequence"]
                ),
                cache_dir=os.path.join(config.workdir, "data_cache"),  # data.tokenizer on raw text
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self._data = iter(self.loader)
        return lm_batch_shapes(config)

    def _build_evaluator(self, token_data: bool) -> Evaluator | None:
        """The compiled evaluation of `eval.sets` (None when there are none)."""
        if not self.config.eval.sets.strip():
            return None
        if not token_data:
            raise ConfigError("eval.sets: evaluation reads token data through the built-in pipeline; with data of "
                              "your own, leave eval.sets empty and evaluate in a Hook")
        try:
            return Evaluator.from_config(self.config, self.setup, self.abstract_batch)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def _sample_hook(self) -> Hook:
        """The `sample.*` hook: prints the prompt's continuation every `sample.every` steps."""
        from efficient_train.train.samples import sample_hook

        if self.setup.model_config is None:
            raise ConfigError("sample.every: samples come from the built-in Llama; with a model of your own, "
                              "leave it 0 and sample in a Hook")
        sample = self.config.sample
        return sample_hook(sample.every, [sample.prompt], tokenizer=self.config.data.tokenizer,
                           max_new_tokens=sample.max_new_tokens, temperature=sample.temperature,
                           top_k=sample.top_k, top_p=sample.top_p, seed=sample.seed)

    def _lock_directories(self) -> None:
        """Process 0 takes the locks (if not held yet); every process learns the verdict and
        stops alike."""
        if self._locked:
            return
        refusal: RunError | None = None
        if self.is_main:
            try:
                for lock in self._locks:
                    lock.acquire()
            except RunError as error:  # in use by another process, or not writable
                refusal = error
        if jax.process_count() > 1:
            refused = multihost_utils.process_allgather(np.asarray(refusal is not None, np.int32))
            if refusal is None and np.any(refused):
                refusal = DirectoryInUse(f"{self.config.workdir}: process 0 of this run could not lock it (see its line)")
        if refusal is not None:
            self._release_locks()
            raise refusal
        self._locked = True

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locked = False

    def _model_record(self) -> dict:
        model_config = self.setup.model_config
        return {} if model_config is None else model_config.record()

    def _finetune_record(self) -> dict | None:
        lora = self.setup.lora
        return None if lora is None or self._base is None else finetune_record(lora, self._base.reference)

    def _restore_or_init(self) -> TrainState:
        """The newest verified step of the checkpoint directory, else a fresh state. A LoRA run reads
        its frozen base from `finetune.base` first; its checkpoints hold adapters and their optimizer
        state only, and must name that same base."""
        self._base = load_base(self.setup, self._model_record()) if self.setup.lora is not None else None
        frozen = None if self._base is None else self._base.params
        restored = self.checkpointer.restore_latest(
            dataclasses.replace(self.setup.abstract_state, frozen=None), model=self._model_record(),
            optimizer=self.config.optimizer.to_dict(), finetune=self._finetune_record(),
        )
        if restored is None:
            if self.is_main and self._base is not None:
                print(f"LoRA: adapters on the frozen base {self._base.step_dir}", flush=True)
            return init_state(self.setup, frozen=frozen)
        state, metadata = restored
        state = state.replace(frozen=frozen)
        self._last_saved_step = metadata.step
        if state.opt_state is None:  # a params-only checkpoint: fine-tuning starts a fresh optimizer
            init = jax.jit(self.setup.step_def.optimizer.init, out_shardings=self.setup.state_shardings.opt_state)
            state = state.replace(opt_state=init(state.params))
            if self.is_main:
                print("the checkpoint holds parameters only: starting a fresh optimizer state", flush=True)
        if self.loader is not None and metadata.data is not None:
            self.loader.restore(LoaderState.from_dict(metadata.data))
        if self.is_main:
            print(f"resumed from {self.checkpointer.step_dir(metadata.step)}", flush=True)
        return state

    def save(self, loader_state: LoaderState | None = None) -> None:
        """Start a background save of the current state (waits for the previous save first).

        Refuses (NonFiniteState) a state the last step reported non-finite. `loader_state`
        overrides the loader's own (the position before a batch that failed to load).
        """
        step = int(self.state.step)
        self._check_state_finite(step)
        self._lock_directories()  # held until fit() ends or close()
        if loader_state is None and self.loader is not None:
            loader_state = self.loader.state()
        self.checkpointer.save(
            step,
            dataclasses.replace(self.state, frozen=None),  # a LoRA run's base is referenced (finetune), not saved again
            model=self._model_record(),
            mesh=dict(self.mesh.shape),
            zero_stage=self.config.zero_stage,
            optimizer=self.config.optimizer.to_dict(),
            data=None if loader_state is None else loader_state.to_dict(),
            seed=self.config.seed,
            finetune=self._finetune_record(),
        )
        self._last_saved_step = step

    def close(self) -> None:
        """Wait for the background save and release the directories (fit() does both itself)."""
        try:
            self.checkpointer.finish()
        finally:
            self._release_locks()

    def _check_state_finite(self, step: int) -> None:
        if self._last_metrics is None or int(self._last_metrics["state_finite"]):
            return
        raise NonFiniteState(
            f"step {step}: the update made the parameters or optimizer state non-finite (an overflow; lr "
            f"{float(self._last_metrics['lr']):.3g}); this state is not saved, the run stops; newest saved step: "
            f"{self._last_saved_step}"
        )

    def _global_shapes(self, local_batch: Any) -> Any:
        rows = jax.process_count()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * rows, *x.shape[1:]), x.dtype), local_batch)

    def _to_device(self, local_batch: Any) -> Any:
        return place_batch(local_batch, self._batch_shardings)

    def _next_batch(self) -> Any:
        if self._first_batch is not None:
            batch, self._first_batch = self._first_batch, None
            return batch
        return next(self._data)

    def startup_record(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "event": "startup",
            "mesh": dict(self.mesh.shape),
            "zero_stage": self.config.zero_stage,
            "num_params": self.setup.num_params,
            "trainable_params": self.setup.num_trainable_params,
            "per_device_bytes": memory_record(self.setup, self.compiled),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "device_kind": jax.devices()[0].device_kind,
            "start_step": int(self.state.step),
        }

    def step(self) -> dict[str, jax.Array]:
        """Run one step; returns its metrics as (not yet fetched) device arrays."""
        return self._run_step(self._next_batch())

    def _run_step(self, local_batch: Any) -> dict[str, jax.Array]:
        self.state, metrics = self.compiled(self.state, self._to_device(local_batch))
        self._last_metrics = metrics
        return metrics

    def _agree(self, problem: BaseException | None) -> tuple[str | None, BaseException | None]:
        """(the signal any process got, the data problem any process met), the same on every
        process, so all of them stop together (one small gather per step when there are several)."""
        signals = (None, "SIGINT", "SIGTERM")  # later wins
        kinds: tuple[Any, ...] = (None, StopIteration, DataReadError, DataError)  # later wins
        signal_code = signals.index(self._stop_signal)
        data_code = 0 if problem is None else max(i for i, kind in enumerate(kinds) if kind and isinstance(problem, kind))
        if jax.process_count() > 1:
            codes = multihost_utils.process_allgather(np.asarray([signal_code, data_code], np.int32)).reshape(-1, 2)
            signal_code = int(codes[:, 0].max())
            if problem is None and codes[:, 1].max() > 0:
                source = int(codes[:, 1].argmax())
                kind = kinds[int(codes[:, 1].max())]
                problem = StopIteration() if kind is StopIteration else kind(
                    f"process {source} of this run met a data problem (its own error line names it)")
        return signals[signal_code], problem

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self._stop_signal == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C aborts without waiting for the step
        self._stop_signal = self._stop_signal or name
        if name == "SIGINT" and self.is_main:
            sys.stderr.write("\ninterrupted: saving at the end of this step (Ctrl-C again aborts without saving)\n")

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps` (or to a stop: a signal, the end of the user's data);
        returns the last logged metrics record."""
        previous_handlers = {}
        if threading.current_thread() is threading.main_thread():  # signals only go there
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous_handlers[signum] = signal.signal(signum, self._on_signal)
        failure: BaseException | None = None
        try:
            self._lock_directories()  # a second fit() of this trainer takes them again
            return self._fit()
        except BaseException as error:
            failure = error
            raise
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            try:
                self.checkpointer.finish()
            except CheckpointWriteError as error:
                if failure is None:
                    raise
                sys.stderr.write(f"\nwarning: {error}\n")  # the failure that stopped the run is the last line
            finally:
                self._release_locks()

    def _check_loss_weight(self, step: int, metrics: dict[str, jax.Array]) -> None:
        if float(metrics["loss_weight"]) <= 0:
            raise ConfigError(
                f"loss_fn: returned a weight of {float(metrics['loss_weight'])} at step {step}; return (sum, weight) "
                "with weight > 0 (the count the sum is over), or a scalar mean"
            )

    def _stop_on_data(self, step: int, loader_state: LoaderState | None, error: BaseException) -> None:
        """Save the last good state (if not saved yet), then say why the run stops."""
        saved = ""
        if step > 0 and self._last_saved_step != step:
            self.save(loader_state)
            self.checkpointer.wait()
            saved = f"; saved step {step}, a rerun continues from there"
        elif self._last_saved_step is not None:
            saved = f"; step {self._last_saved_step} is saved, a rerun continues from there"
        if isinstance(error, StopIteration):
            message = f"the data ended after step {step}, before train.steps={self.config.train.steps}{saved}"
            self.records.write({"event": "data_exhausted", "step": step})
            if self.is_main:
                print(message, flush=True)
            return
        raise type(error)(f"{error}{saved}") from None

    def _fit(self) -> dict[str, Any]:
        """The loop: each step fetches a batch, stops where every process agrees to, runs, saves
        when the checkpointer says so, and logs and calls hooks when they are due."""
        steps = self.config.train.steps
        trackers = tracker_sinks(self.config, resuming=int(self.state.step) > 0) if self.is_main else []
        console = ConsoleProgress(steps, int(self.state.step), self.is_main)
        self.records = RecordStream([self.writer, console, *trackers])
        try:  # an error (a failed save included) leaves a closed bar and file, so it is the last thing printed
            self.records.write(self.startup_record())
            record: dict[str, Any] = {"step": int(self.state.step)}
            interval, first_step = _Interval(), True
            while int(self.state.step) < steps:
                step = int(self.state.step)
                loader_state = None if self.loader is None else self.loader.state()  # before this batch
                batch, problem = self._fetch_batch()
                stop_signal, problem = self._agree(problem)
                if problem is not None:
                    self._stop_on_data(step, loader_state, problem)
                    self.stop_reason = "data_exhausted"
                    break
                if stop_signal is not None:
                    self._stop_on_signal(step, loader_state, stop_signal)
                    break
                with self.profile.step(step + 1):
                    metrics = self._run_step(batch)
                step = int(self.state.step)
                self.profile.after_step(step, metrics)
                if first_step and self._custom_loss:
                    self._check_loss_weight(step, metrics)  # a loss_fn bug shows at its first step
                first_step = False
                interval.steps += 1
                console.advance()
                if self.checkpointer.save_due(step, final=step == steps):
                    self.save()
                due_hooks = [hook for hook in self.hooks if step % hook.every == 0]
                if self._log_due(step) or due_hooks:
                    record = self._log_record(step, metrics, interval)
                    self.records.write(record)
                    for hook in due_hooks:
                        hook.fn(self, step, record)
                    interval = _Interval()
                if self._eval_due(step):
                    assert self.evaluator is not None  # _eval_due: evaluation sets exist
                    self.records.write(self.evaluator.run(self.state.params, step, self.state.frozen))
                    interval = _Interval()  # throughput counts training steps only
        finally:
            self.profile.close()
            self.records.close()
        return record

    def _fetch_batch(self) -> tuple[Any, BaseException | None]:
        """(this process's next batch, None), or (None, the problem that kept it from loading)."""
        try:
            return self._next_batch(), None
        except (StopIteration, DataError, DataReadError) as error:
            return None, error

    def _stop_on_signal(self, step: int, loader_state: LoaderState | None, stop_signal: str) -> None:
        """Preemption (SIGTERM) or Ctrl-C, at a step boundary: save this step's state (if not yet saved) and record why."""
        if self._last_saved_step != step:
            self.save(loader_state)
        self.records.write({"event": "preempted", "signal": stop_signal, "step": step})
        self.stop_reason = stop_signal

    def _eval_due(self, step: int) -> bool:
        every = self.config.eval.every
        return self.evaluator is not None and ((every > 0 and step % every == 0) or step == self.config.train.steps)

    def _log_due(self, step: int) -> bool:
        return step % self.config.train.log_every == 0 or step == self.config.train.steps

    def _log_record(self, step: int, metrics: dict[str, jax.Array], interval: _Interval) -> dict[str, Any]:
        """The metrics record of a logged step: the step's scalars, throughput over the steps since
        the last record, and the loader's own figures (a mixture's realized shares)."""
        self._check_state_finite(step)
        fetched = {name: float(value) for name, value in jax.device_get(metrics).items() if name not in GUARD_METRICS}
        record: dict[str, Any] = {"step": step, **fetched}
        record.update(
            throughput(
                tokens_per_step=self.tokens_per_step,
                step_time_s=interval.seconds() / interval.steps,
                flops_per_token=self.setup.flops_per_token(self.config.data.seq_len),
                num_devices=jax.device_count(),
                peak=self._peak_tflops,
            )
        )
        if self.loader is not None:
            record.update(self.loader.metrics())
        return record


@dataclasses.dataclass
class _Interval:
    """The steps run since the last metrics record, and when they started (for throughput)."""

    steps: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start
