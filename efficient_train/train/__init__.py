"""Training: the Trainer, its state, the step builder, losses and metrics."""
from efficient_train.train.loss import next_token_loss
from efficient_train.train.state import TrainState
from efficient_train.train.trainer import Hook, Trainer

__all__ = ["Hook", "TrainState", "Trainer", "next_token_loss"]
