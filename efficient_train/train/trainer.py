"""Trainer: builds mesh, model, optimizer and data from a config, and runs the loop.

`Trainer(config)` trains the built-in Llama on the configured data source;
`Trainer(config, model=..., loss_fn=..., data=...)` trains the user's own Flax NNX
module under the same mesh and ZeRO stage. The step is compiled ahead of time, once,
so the startup record can report the compiled program's per-device memory before
the first step runs. Only process 0 writes metrics and the console.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from efficient_train.config import validate
from efficient_train.data import Batch, build_loader
from efficient_train.mesh import make_mesh
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
        if data is None:
            self.loader = build_loader(
                config.data,
                vocab_size=config.model.vocab_size,
                global_batch_size=config.train.batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            data = self.loader
        else:
            self.loader = None
        self._data: Iterator[Any] = iter(data)
        self._first_batch = next(self._data)
        self.program = build_program(
            config, self.mesh, model=model, loss_fn=loss_fn, shard_sequence=isinstance(self._first_batch, Batch)
        )
        self.state: TrainState = init_state(self.program)
        global_batch = self._global_shapes(self._first_batch)
        self._step_fn = build_train_step(self.program.spec, self.program.state_shardings, global_batch)
        self.abstract_batch = self.program.abstract_batch(global_batch)
        self.compiled = self._step_fn.lower(self.state, self.abstract_batch).compile()
        self.writer = MetricsWriter(config.workdir, enabled=self.is_main)
        self._batch_shardings = jax.tree.map(lambda x: x.sharding, self.abstract_batch)
        # Tokens for a token batch; examples (the leading dim) for a user's batch.
        leading = jax.tree.leaves(global_batch)[0].shape
        self.tokens_per_step = leading[0] * leading[1] if isinstance(global_batch, Batch) else leading[0]

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
        }

    def step(self) -> dict[str, jax.Array]:
        """Run one step; returns its metrics as (not yet fetched) device arrays."""
        batch = self._to_device(self._next_batch())
        self.state, metrics = self.compiled(self.state, batch)
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns the last logged metrics record."""
        train = self.config.train
        startup = self.startup_record()
        self.writer.write(startup)
        peak = peak_tflops(jax.devices()[0])
        seq_len = self.config.data.seq_len
        progress = tqdm(total=train.steps, initial=int(self.state.step), disable=not self.is_main, dynamic_ncols=True)
        record: dict[str, Any] = {}
        interval_start, interval_steps = time.perf_counter(), 0
        while int(self.state.step) < train.steps:
            metrics = self.step()
            step = int(self.state.step)
            interval_steps += 1
            progress.update(1)
            due_hooks = [hook for hook in self.hooks if step % hook.every == 0]
            if step % train.log_every and step != train.steps and not due_hooks:
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
        progress.close()
        self.writer.close()
        return record
