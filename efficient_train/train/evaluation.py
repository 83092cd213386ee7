"""Evaluation: the loss of named sets under the current parameters, on the training mesh.

`Evaluator` compiles one forward-only program, once, for the training step's batch shape
and shardings: the same `make_local_loss` the train step differentiates (ZeRO-3 gathers
and the sequence split included) inside the same `shard_map` over the batch axes,
gradient-accumulation micro-batches scanned the same way, the (sum, weight) summed over
the batch axes. Parameters are read, never donated, so evaluating leaves the training
state as it was; each set has its own loader (data/eval_sets.py), so the training
stream and its resume state are untouched.

A set's record keys are `eval/<set>/loss` (mean nats per target token over the batches
evaluated), `eval/<set>/perplexity` (exp of it), `eval/<set>/bits_per_byte` (nats / ln 2
/ the set's UTF-8 bytes per token; only where the bytes are known: byte-level data, or a
prepared directory that counted them) and `eval/<set>/tokens` (the targets counted), and
`eval_time_s` the wall time of the whole evaluation.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_train.data.eval_sets import EvalSet, build_eval_set, parse_eval_sets
from efficient_train.parallel import layout
from efficient_train.train.step import (
    StepDefinition,
    batch_axes,
    batch_specs,
    make_local_loss,
    micro_batches,
    over_batch_axes,
    place_batch,
)
from efficient_train.train.training_setup import TrainSetup


def build_eval_step(step_def: StepDefinition, param_shardings: Any, example_batch: Any,
                    frozen_shardings: Any = None) -> Any:
    """A jitted `eval_step(params, frozen, batch) -> (loss sum, weight)` over the global batch
    (`frozen`: a LoRA run's base, {} otherwise)."""
    local_loss = make_local_loss(step_def)
    axes = batch_axes(dict(step_def.plan.mesh.shape))

    def local(params: dict, frozen: dict, batch: Any) -> tuple[jax.Array, jax.Array]:
        if step_def.grad_accum == 1:
            total, weight = local_loss(params, frozen, batch)
        else:
            def accumulate(carry, micro_batch):
                t, w = local_loss(params, frozen, micro_batch)
                return (carry[0] + t, carry[1] + w), None

            (total, weight), _ = jax.lax.scan(accumulate, (jnp.zeros(()), jnp.zeros(())),
                                              micro_batches(batch, step_def.grad_accum))
        if axes:
            total, weight = jax.lax.psum((total, weight), axes)
        return total, weight

    batch_shardings = jax.tree.map(lambda s: NamedSharding(step_def.plan.mesh, s),
                                   batch_specs(example_batch, step_def.shard_sequence))
    return jax.jit(over_batch_axes(local, step_def, example_batch, (P(), P())),
                   in_shardings=(param_shardings, frozen_shardings or {}, batch_shardings))


def set_metrics(name: str, total: float, weight: float, bytes_per_token: float | None) -> dict[str, float | None]:
    """The record keys of one set from its summed loss and target count."""
    loss = total / weight if weight > 0 else None
    record: dict[str, float | None] = {
        f"eval/{name}/loss": loss,
        f"eval/{name}/perplexity": None if loss is None else math.exp(min(loss, 700.0)),
        f"eval/{name}/tokens": weight,
    }
    if bytes_per_token is not None:
        record[f"eval/{name}/bits_per_byte"] = None if loss is None else loss / math.log(2) / bytes_per_token
    return record


class Evaluator:
    """The sets of `eval.sets`, their batch count, and the compiled forward program."""

    def __init__(self, setup: TrainSetup, sets: list[EvalSet], steps: int, abstract_batch: Any) -> None:
        self.sets = sets
        self.steps = steps
        self._batch_shardings = jax.tree.map(lambda x: x.sharding, abstract_batch)
        state, shardings = setup.abstract_state, setup.state_shardings
        self.compiled = build_eval_step(setup.step_def, shardings.params, abstract_batch, shardings.frozen).lower(
            state.params, state.frozen or {}, abstract_batch).compile()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, setup: TrainSetup, abstract_batch: Any,
                    sets_text: str | None = None) -> Evaluator:
        """The evaluator of `sets_text` (default: config.eval.sets) for this setup's mesh."""
        mesh_shape = dict(setup.mesh.shape)
        column_order = layout.column_order(config.sequence_parallel.mode, config.data.seq_len, mesh_shape["sequence"])
        sets = [
            build_eval_set(spec, config.data, vocab_size=config.model.vocab_size,
                           global_batch_size=config.train.batch_size, process_index=jax.process_index(),
                           process_count=jax.process_count(), column_order=column_order,
                           cache_dir=os.path.join(config.workdir, "data_cache"))
            for spec in parse_eval_sets(config.eval.sets if sets_text is None else sets_text)
        ]
        return cls(setup, sets, config.eval.steps, abstract_batch)

    def run(self, params: Any, step: int, frozen: Any = None) -> dict[str, Any]:
        """The evaluation record of `params` (and a LoRA run's `frozen` base) at `step`.

        One batch is in flight at a time, as in training (the CPU backend's collectives can
        stall when many multi-device programs are queued); the next batch is read from disk
        while the device computes.
        """
        start = time.perf_counter()
        record: dict[str, Any] = {"step": step}
        for eval_set in self.sets:
            total = weight = 0.0
            count = eval_set.num_batches(self.steps)
            host_batch = eval_set.batch(0)
            for i in range(count):
                out = self.compiled(params, frozen or {}, place_batch(host_batch, self._batch_shardings))
                if i + 1 < count:
                    host_batch = eval_set.batch(i + 1)
                batch_total, batch_weight = jax.device_get(out)
                total, weight = total + float(batch_total), weight + float(batch_weight)
            record.update(set_metrics(eval_set.name, total, weight, eval_set.bytes_per_token))
        record["eval_time_s"] = time.perf_counter() - start
        return record
