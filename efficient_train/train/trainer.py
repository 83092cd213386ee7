"""Trainer: builds mesh, model, optimizer and data from a config, and runs the loop.

`Trainer(config)` trains the built-in Llama on the configured data source;
`Trainer(config, model=..., loss_fn=..., data=...)` trains the user's own Flax NNX
module under the same mesh and ZeRO stage. The step is compiled ahead of time, once,
so the startup record can report the compiled program's per-device memory before
the first step runs. Only process 0 writes metrics and the console.

Checkpoints: at start the newest verified step in `checkpoint.dir` (default
`<workdir>/checkpoints`) is restored onto this run's mesh, with the data loader's
position, so a restarted command continues where it stopped. Saves run in the
background every `checkpoint.every` steps and at the end; SIGTERM (preemption) makes
every process save at the same next step boundary and return.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from efficient_train.checkpoint import Checkpointer
from efficient_train.config import ConfigError, validate
from efficient_train.data import Batch, LoaderState, build_loader
from efficient_train.mesh import make_mesh
from efficient_train.parallel import layout
from efficient_train.sharding import per_device_bytes
from efficient_train.train.metrics import MetricsWriter, peak_tflops, throughput
from efficient_train.train.program import Program, build_program, init_state, lm_batch_shapes
from efficient_train.train.state import TrainState
from efficient_train.train.step import LossFn, build_train_step


@dataclasses.dataclass(frozen=True)
class Hook:
    """Calls `fn(trainer, step, metrics)` every `every` steps (after the step ran)."""

    every: int
    fn: Callable[["Trainer", int, dict], None]


def memory_record(program: Program, compiled: Any) -> dict[str, int]:
    """Per-device bytes of the compiled step: state from its shardings, temp from XLA."""
    analysis = compiled.memory_analysis()
    params = per_device_bytes(program.abstract_state.params, program.state_shardings.params)
    opt_state = per_device_bytes(program.abstract_state.opt_state, program.state_shardings.opt_state)
    temp = int(analysis.temp_size_in_bytes)
    total = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes + temp)
    return {"params": params, "opt_state": opt_state, "temp": temp, "total": total}


class Trainer:
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
        self._first_batch: Any = None
        if data is None:
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
                )
            except ValueError as error:
                raise ConfigError(str(error)) from None
            self._data: Iterator[Any] = iter(self.loader)
            global_batch: Any = lm_batch_shapes(config)
        else:
            self.loader = None
            self._data = iter(data)
            self._first_batch = next(self._data)
            global_batch = self._global_shapes(self._first_batch)
        self.program = build_program(
            config, self.mesh, model=model, loss_fn=loss_fn, shard_sequence=isinstance(global_batch, Batch)
        )
        self.checkpointer = Checkpointer(
            config.checkpoint.dir or os.path.join(config.workdir, "checkpoints"),
            keep=config.checkpoint.keep,
            keep_every=config.checkpoint.keep_every,
            async_save=config.checkpoint["async"],
        )
        self.state: TrainState = self._restore_or_init()
        self._step_fn = build_train_step(self.program.spec, self.program.state_shardings, global_batch)
        self.abstract_batch = self.program.abstract_batch(global_batch)
        self.compiled = self._step_fn.lower(self.state, self.abstract_batch).compile()
        self.writer = MetricsWriter(config.workdir, enabled=self.is_main)
        self._batch_shardings = jax.tree.map(lambda x: x.sharding, self.abstract_batch)
        # Tokens for a token batch; examples (the leading dim) for a user's batch.
        leading = jax.tree.leaves(global_batch)[0].shape
        self.tokens_per_step = leading[0] * leading[1] if isinstance(global_batch, Batch) else leading[0]
        self._preempted = False

    def _model_record(self) -> dict:
        model_config = self.program.model_config
        return {} if model_config is None else dataclasses.asdict(model_config)

    def _restore_or_init(self) -> TrainState:
        restored = self.checkpointer.restore_latest(self.program.abstract_state, model=self._model_record())
        if restored is None:
            return init_state(self.program)
        state, metadata = restored
        if state.opt_state is None:  # a params-only checkpoint: fine-tuning starts a fresh optimizer
            init = jax.jit(self.program.spec.optimizer.init, out_shardings=self.program.state_shardings.opt_state)
            state = state.replace(opt_state=init(state.params))
            if self.is_main:
                print("the checkpoint holds parameters only: starting a fresh optimizer state", flush=True)
        if self.loader is not None and metadata.data is not None:
            self.loader.restore(LoaderState.from_dict(metadata.data))
        if self.is_main:
            print(f"resumed from {self.checkpointer.step_dir(metadata.step)}", flush=True)
        return state

    def save(self) -> None:
        """Start a background save of the current state (waits for the previous save first)."""
        self.checkpointer.save(
            int(self.state.step),
            self.state,
            model=self._model_record(),
            mesh=dict(self.mesh.shape),
            zero_stage=self.config.zero_stage,
            optimizer=self.config.optimizer.to_dict(),
            data=None if self.loader is None else self.loader.state().to_dict(),
            seed=self.config.seed,
        )

    def _global_shapes(self, local_batch: Any) -> Any:
        rows = jax.process_count()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * rows, *x.shape[1:]), x.dtype), local_batch)

    def _to_device(self, local_batch: Any) -> Any:
        return jax.tree.map(
            lambda x, sharding: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
            local_batch,
            self._batch_shardings,
        )

    def _next_batch(self) -> Any:
        if self._first_batch is not None:
            batch, self._first_batch = self._first_batch, None
            return batch
        return next(self._data)

    def startup_record(self) -> dict[str, Any]:
        return {
            "event": "startup",
            "mesh": dict(self.mesh.shape),
            "zero_stage": self.config.zero_stage,
            "num_params": self.program.num_params,
            "per_device_bytes": memory_record(self.program, self.compiled),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "device_kind": jax.devices()[0].device_kind,
            "start_step": int(self.state.step),
        }

    def step(self) -> dict[str, jax.Array]:
        """Run one step; returns its metrics as (not yet fetched) device arrays."""
        batch = self._to_device(self._next_batch())
        self.state, metrics = self.compiled(self.state, batch)
        return metrics

    def _preemption_requested(self) -> bool:
        """Whether any process got SIGTERM; every process gets the same answer."""
        if jax.process_count() == 1:
            return self._preempted
        flags = multihost_utils.process_allgather(np.asarray(self._preempted, np.int32))
        return bool(np.any(flags))

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._preempted = True

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps` (or to a preemption); returns the last logged metrics record."""
        previous_handler = None
        if threading.current_thread() is threading.main_thread():  # signals only go there
            previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._fit()
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            self.checkpointer.wait()

    def _fit(self) -> dict[str, Any]:
        train, every = self.config.train, self.config.checkpoint.every
        self.writer.write(self.startup_record())
        peak = peak_tflops(jax.devices()[0])
        seq_len = self.config.data.seq_len
        progress = tqdm(total=train.steps, initial=int(self.state.step), disable=not self.is_main, dynamic_ncols=True)
        try:  # an error (a failed save included) leaves a closed bar and file, so it is the last thing printed
            record: dict[str, Any] = {"step": int(self.state.step)}
            interval_start, interval_steps = time.perf_counter(), 0
            while int(self.state.step) < train.steps:
                metrics = self.step()
                step = int(self.state.step)
                interval_steps += 1
                progress.update(1)
                preempted = self._preemption_requested()
                if preempted or step == train.steps or (every and step % every == 0):
                    self.save()
                due_hooks = [hook for hook in self.hooks if step % hook.every == 0]
                if step % train.log_every and step != train.steps and not due_hooks and not preempted:
                    continue
                fetched = {name: float(value) for name, value in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - interval_start
                record = {"step": step, **fetched}
                record.update(
                    throughput(
                        tokens_per_step=self.tokens_per_step,
                        step_time_s=elapsed / interval_steps,
                        flops_per_token=self.program.flops_per_token(seq_len),
                        num_devices=jax.device_count(),
                        peak=peak,
                    )
                )
                self.writer.write(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if self.is_main:
                    progress.write(
                        f"step {step:>6} | loss {record['loss']:.4f} | grad_norm {record['grad_norm']:.3f} | "
                        f"lr {record['lr']:.2e} | {record['tokens_per_sec']:.0f} tok/s"
                    )
                for hook in due_hooks:
                    hook.fn(self, step, record)
                interval_start, interval_steps = time.perf_counter(), 0
                if preempted:
                    self.writer.write({"event": "preempted", "step": step})
                    break
        finally:
            progress.close()
            self.writer.close()
        return record
