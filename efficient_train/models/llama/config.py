"""The model's hyperparameters as one frozen dataclass, plus its size and cost.

`ModelConfig` is what the model is built from and what the trainer reports: the exact
parameter count (startup record) and the FLOPs per token (MFU). Both are derived from
the same fields the model reads, and a test checks the count against the real
parameters, so the reported numbers cannot drift from the model.

It is a frozen dataclass rather than the ConfigDict itself so that the model sees
typed, validated, hashable values; `from_config_dict` is the one bridge from the
ml_collections config files. Its errors are ConfigErrors (ValueErrors, and InputErrors
the CLI prints as one line), though `config.validate` normally refuses the same values
first, naming the field.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from efficient_train.errors import ConfigError
from efficient_train.models.choices import ATTENTION_IMPLS, NORM_IMPLS, REMAT_POLICIES
from efficient_train.models.choices import DTYPES as DTYPE_NAMES

# The allowed names are models/choices.py's tuples; these Literals only spell them again
# for type checkers (a test holds them equal).
RematPolicy = Literal["none", "full", "save_dots"]
AttentionImpl = Literal["auto", "xla", "cudnn", "pallas"]
NormImpl = Literal["auto", "xla", "pallas"]
DTypeName = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: pre-norm RMSNorm blocks, RoPE, GQA attention, SwiGLU MLP.

    dtype is the compute dtype (matmul inputs and activations); param_dtype is how
    parameters are stored (cast to dtype at use). Logits and softmax are always fp32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    remat: RematPolicy = "none"
    scan_layers: bool = True
    dtype: DTypeName = "bfloat16"
    param_dtype: DTypeName = "float32"
    attention_impl: AttentionImpl = "auto"
    norm_impl: NormImpl = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be divisible by "
                f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"model.{name}: {value!r} must be a finite number > 0")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.norm_impl not in NORM_IMPLS:
            raise ConfigError(f"model.norm_impl must be one of {NORM_IMPLS}, got {self.norm_impl!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ConfigError(f"model.{name} must be one of {DTYPE_NAMES}, got {getattr(self, name)!r}")

    @classmethod
    def from_config_dict(cls, cfg: Any, attention_impl: str | None = None,
                         norm_impl: str | None = None) -> ModelConfig:
        """Builds from a ConfigDict (or mapping) whose keys are this class's field names.

        Missing optional fields take their defaults; unknown keys are an error, so a typo
        in a config file cannot silently fall back to a default. `attention_impl` and
        `norm_impl`, when given, override the ones in `cfg` (they live elsewhere in the
        config: attention.impl, norm.impl).
        """
        values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        if attention_impl is not None:
            values["attention_impl"] = attention_impl
        if norm_impl is not None:
            values["norm_impl"] = norm_impl
        missing = sorted(
            f.name for f in dataclasses.fields(cls)
            if f.name not in values and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"model config is missing required keys: {missing}")
        return cls(**values)

    def num_params(self) -> int:
        """Exact number of parameters of `Llama(self)` (every element of every Param)."""
        return parameter_count(self)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

            6 * N_matmul + 6 * L * H * head_dim * seq_len

        N_matmul counts the parameters used in matmuls: every layer's projections plus
        the output projection (the embedding matrix itself when tied). The embedding
        lookup and the norm scales do no matmul FLOPs and are excluded. Each matmul
        parameter costs 2 FLOPs forward and 4 backward per token, hence 6.

        Attention scores and the weighted sum each cost 2 * H * head_dim * seq_len FLOPs
        per token and layer forward, times 3 for the backward: 12 * L * H * head_dim *
        seq_len; causal masking halves it on average (each query sees half the keys).
        Segment masking of packed documents is not counted (it depends on the data).
        """
        n_matmul = self.num_layers * layer_matmul_params(self) + self.vocab_size * self.hidden_size
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len // 2
        return 6 * n_matmul + attention


def layer_matmul_params(model: Any) -> int:
    """Parameters of one decoder block's matmuls: q, o, k, v and the SwiGLU gate, up, down."""
    e, d = model.hidden_size, model.head_dim
    attention = e * d * (2 * model.num_heads + 2 * model.num_kv_heads)
    mlp = 3 * e * model.intermediate_size
    return attention + mlp


def parameter_count(model: Any) -> int:
    """Exact parameter count of a Llama with `model`'s fields (a ModelConfig, or the run config's
    `model` section, which config.validate sizes before any ModelConfig exists), in Python ints."""
    e = model.hidden_size
    per_layer = layer_matmul_params(model) + 2 * e  # two RMSNorm scales
    embeddings = model.vocab_size * e * (1 if model.tie_embeddings else 2)
    return embeddings + model.num_layers * per_layer + e  # + final norm
