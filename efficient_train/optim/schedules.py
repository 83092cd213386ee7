"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The decay runs from the end of warmup to the last step and ends at
`min_lr_ratio x peak`, so a short run and a long one with the same ratio shapes
decay alike.
"""
from __future__ import annotations

import optax


def make_schedule(kind: str, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> optax.Schedule:
    end_lr = peak_lr * min_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=min_lr_ratio)
    elif kind == "linear":
        decay = optax.linear_schedule(peak_lr, end_lr, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak_lr)
    else:
        raise ValueError(f"train.schedule: {kind!r} is not allowed; choose one of 'cosine', 'linear', 'constant'")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(peak_lr / warmup_steps, peak_lr, warmup_steps - 1) if warmup_steps > 1 else optax.constant_schedule(peak_lr)
    return optax.join_schedules([warmup, decay], [warmup_steps])
