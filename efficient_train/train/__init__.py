"""Training: the setup decided from abstract shapes (training_setup.py), the compiled step (step.py),
the loop (trainer.py), memory estimates without devices (estimate.py, memory.py), metrics.

The names below are imported on first use (efficient_train/lazy.py), so `estimate`
does not load the trainer (and Orbax) it never uses.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from efficient_train.lazy import lazy_attributes

__all__ = ["Hook", "TrainState", "Trainer", "next_token_loss"]
__getattr__, __dir__ = lazy_attributes(__name__, {
    "next_token_loss": "efficient_train.train.loss",
    "TrainState": "efficient_train.train.state",
    **dict.fromkeys(["Hook", "Trainer"], "efficient_train.train.trainer"),
})

if TYPE_CHECKING:
    from efficient_train.train.loss import next_token_loss
    from efficient_train.train.state import TrainState
    from efficient_train.train.trainer import Hook, Trainer
