"""One process of a 2-process run (jax.distributed, gloo) whose data fails on process 1 only.

    python -m tests.support.data_failure_worker PROCESS_ID PORT WORKDIR

Process 1's iterator raises DataError when asked for its 4th batch; process 0's data
is fine. Both must stop together after saving step 3 (neither may wait forever in a
collective the other never joins); each prints its error line and exits 2.
"""
from __future__ import annotations

import sys

import jax

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from flax import nnx  # noqa: E402

from efficient_train import Trainer, get_config  # noqa: E402
from efficient_train.data import DataError  # noqa: E402
from tests.test_trainer import MLP, classification_batches, classification_loss  # noqa: E402


def local_batches():
    for index, batch in enumerate(classification_batches(seed=process_id)):
        if process_id == 1 and index == 3:
            raise DataError("shard-1.jsonl: line 7: not valid JSON")
        yield {"x": batch["x"][:16], "y": batch["y"][:16]}  # 16 rows here, 32 in the global batch


config = get_config()
config.mesh.data = 8
config.workdir = workdir
config.train.update(steps=6, batch_size=32, warmup_steps=0, log_every=1)
config.checkpoint.every = 0
with nnx.use_eager_sharding(False):
    model = MLP(nnx.Rngs(0))
try:
    Trainer(config, model=model, loss_fn=classification_loss, data=local_batches()).fit()
except DataError as error:
    print(f"DataError: {error}", flush=True)
    sys.exit(2)
print("finished without an error", flush=True)
