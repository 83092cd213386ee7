"""Loss curves of the same run under several settings, side by side (e.g. FP8 against bf16).

Trains `--steps` steps of `--config` (with the given overrides) once per value of
`--field` in `--values`, same seed and data, and prints each run's loss every
`--every` steps and the ratio of the final losses (mean of the last `--every` steps)
to the first value's.

    python benchmarks/loss_curves.py --config configs/llama_8b.py --steps 200 \\
        --field model.matmul_precision --values bf16,fp8 --config.model.num_layers=4
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--field", default="model.matmul_precision")
    parser.add_argument("--values", default="bf16,fp8")
    args, extra = parser.parse_known_args()

    from efficient_train import Trainer, get_config
    from efficient_train.cli import _split_overrides
    from efficient_train.config import apply_overrides

    curves: dict[str, list[float]] = {}
    for value in args.values.split(","):
        config = get_config(args.config)
        apply_overrides(config, _split_overrides(extra + [f"--config.{args.field}={value}"]))
        config.train.steps = args.steps
        config.checkpoint.every = 0
        config.tracker.tensorboard = False
        config.workdir = tempfile.mkdtemp(prefix="efficient_train_curves_")
        trainer = Trainer(config)
        losses = [float(trainer.step()["loss"]) for _ in range(args.steps)]
        curves[value] = losses
        print(json.dumps({args.field: value, "loss_every": losses[args.every - 1::args.every]}), flush=True)
        del trainer
        gc.collect()
    first = next(iter(curves))
    final = {value: statistics.mean(losses[-args.every:]) for value, losses in curves.items()}
    print(json.dumps({"final_loss": final, "ratio_to_" + first: {v: round(f / final[first], 4) for v, f in final.items()}}))


if __name__ == "__main__":
    main()
