"""Llama-family decoder in Flax NNX and the attention dispatch it calls."""
from efficient_train.models.attention import attention
from efficient_train.models.config import ModelConfig
from efficient_train.models.llama import Llama

__all__ = ["Llama", "ModelConfig", "attention"]
