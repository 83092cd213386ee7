"""The Trainer API: a user's own module under ZeRO-3, skipped non-finite steps, hooks,
the metrics file, schedules and the weight-decay mask, and learning on data whose best
achievable loss is known."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_train import Hook, Trainer, get_config
from efficient_train.data import SyntheticSource
from efficient_train.optim import decay_mask, make_schedule
from efficient_train.parallel.sharding import per_device_bytes
from tests.support.zero_setup import small_config


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.hidden = nnx.Linear(16, 64, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.out = nnx.Linear(64, 4, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def classification_loss(model, batch):
    logits = model(batch["x"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1))


def classification_batches(seed=0, bad_step=None):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(16, 4))
    step = 0
    while True:
        x = rng.normal(size=(32, 16)).astype(np.float32)
        y = np.argmax(x @ teacher, axis=1).astype(np.int32)
        if step == bad_step:
            x[0, 0] = np.inf
        yield {"x": x, "y": y}
        step += 1


def _mlp_config(tmp_path, steps=30, stage=3):
    c = get_config()
    c.mesh.data = 8
    c.zero_stage = stage
    c.train.update(steps=steps, batch_size=32, warmup_steps=0, learning_rate=1e-2, log_every=10)
    c.workdir = str(tmp_path)
    return c


def test_user_module_trains_under_zero3(tmp_path):
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    trainer = Trainer(_mlp_config(tmp_path), model=model, loss_fn=classification_loss, data=classification_batches())
    shardings = trainer.setup.state_shardings.params
    # The 16x64 and 64x4 kernels and the 64 bias are sharded 8 ways; the 4-wide bias stays whole.
    assert shardings["hidden"]["kernel"].spec == jax.sharding.PartitionSpec(None, "data")
    total = sum(x.size * 4 for x in jax.tree.leaves(trainer.setup.abstract_state.params))
    assert per_device_bytes(trainer.setup.abstract_state.params, shardings) <= total / 8 + 4 * 4
    first = float(trainer.step()["loss"])
    final = trainer.fit()
    assert final["step"] == 30 and final["loss"] < 0.47 * first  # measured 0.411-0.435 (model and data seeds 0-2)


def test_non_finite_step_is_skipped_and_state_untouched(tmp_path):
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    trainer = Trainer(_mlp_config(tmp_path, stage=2), model=model, loss_fn=classification_loss,
                      data=classification_batches(bad_step=1))
    trainer.step()
    before = jax.device_get((trainer.state.params, trainer.state.opt_state))
    metrics = trainer.step()  # its batch holds an inf
    after = jax.device_get((trainer.state.params, trainer.state.opt_state))
    assert not math.isfinite(float(metrics["loss"]))
    assert int(trainer.state.skipped_steps) == 1 and int(trainer.state.step) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    metrics = trainer.step()
    assert math.isfinite(float(metrics["loss"])) and int(trainer.state.skipped_steps) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[0]), jax.tree.leaves(jax.device_get(trainer.state.params)))]
    assert all(changed)


def test_hooks_and_metrics_file(tmp_path):
    calls = []
    config = small_config(**{"mesh.data": 8, "train.steps": 6, "train.log_every": 3})
    config.workdir = str(tmp_path)
    trainer = Trainer(config, hooks=[Hook(every=2, fn=lambda t, step, record: calls.append((step, record["loss"])))])
    trainer.fit()
    assert [step for step, _ in calls] == [2, 4, 6]
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    startup, steps = records[0], records[1:]
    assert startup["event"] == "startup" and startup["zero_stage"] == config.zero_stage
    assert startup["mesh"] == {"replica": 1, "data": 8, "expert": 1, "sequence": 1, "tensor": 1}
    assert startup["num_params"] == trainer.setup.model_config.num_params()
    assert set(startup["per_device_bytes"]) == {"params", "opt_state", "temp", "total"}
    assert all(v > 0 for v in startup["per_device_bytes"].values())
    expected = {"step", "loss", "grad_norm", "lr", "tokens_per_sec", "tokens_per_sec_per_device",
                "step_time_s", "model_tflops_per_device", "mfu", "skipped_steps"}
    # Logged at log_every and at the hook steps; MFU is null on the CPU.
    assert [r["step"] for r in steps] == [2, 3, 4, 6]
    for record in steps:
        assert set(record) == expected and record["mfu"] is None
        assert record["tokens_per_sec"] == pytest.approx(8 * record["tokens_per_sec_per_device"])


def test_schedule_warmup_then_cosine_to_floor():
    schedule = make_schedule("cosine", 1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    values = [float(schedule(step)) for step in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[60] == pytest.approx(0.55, abs=1e-2)
    assert values[110] == pytest.approx(0.1)
    assert all(b <= a + 1e-7 for a, b in zip(values[10:], values[11:]))
    linear = make_schedule("linear", 1.0, warmup_steps=0, total_steps=100, min_lr_ratio=0.0)
    assert float(linear(50)) == pytest.approx(0.5)


def test_decay_mask_spares_norms_even_when_stacked():
    from efficient_train.models import Llama, ModelConfig

    cfg = ModelConfig.from_config_dict(small_config().model)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    mask = decay_mask(nnx.state(abstract, nnx.Param))
    assert mask["blocks"]["attn_norm"]["scale"] is False and mask["final_norm"]["scale"] is False
    assert mask["blocks"]["mlp"]["up"]["kernel"] is True and mask["embed"]["embedding"] is True


@pytest.mark.slow
def test_learns_synthetic_data_toward_its_best_loss(tmp_path):
    config = small_config(**{"mesh.data": 8, "train.steps": 120, "train.learning_rate": 1e-2,
                             "train.warmup_steps": 10, "train.log_every": 120})
    config.workdir = str(tmp_path)
    final = Trainer(config).fit()
    best = SyntheticSource(config.model.vocab_size, config.data.seed).best_loss
    uniform = math.log(config.model.vocab_size)
    # Most of the gap from guessing to the best achievable loss is closed.
    # measured 5.3% of the gap left (seed 0, run here); 3.5% and 7.3% with seeds 1 and 2
    assert final["loss"] < best + 0.09 * (uniform - best), (final["loss"], best)
