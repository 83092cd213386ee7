"""Optimizers and schedules: `adamw` (an optax GradientTransformation) and `make_schedule`."""
from efficient_train.optim.adamw import adamw, decay_mask
from efficient_train.optim.schedules import make_schedule

__all__ = ["adamw", "decay_mask", "make_schedule"]
