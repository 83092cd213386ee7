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
from efficient_train.models.choices import (
    ACTIVATIONS,
    ATTENTION_IMPLS,
    MATMUL_PRECISIONS,
    MOE_IMPLS,
    NORM_IMPLS,
    REMAT_POLICIES,
    ROPE_TYPES,
    ROUTERS,
)
from efficient_train.models.choices import DTYPES as DTYPE_NAMES

# The allowed names are models/choices.py's tuples; these Literals only spell them again
# for type checkers (a test holds them equal).
RematPolicy = Literal["none", "save_dots", "save_attention", "save_qkv", "full",
                      "offload_dots", "offload_attention", "offload_qkv"]
AttentionImpl = Literal["auto", "xla", "cudnn", "pallas"]
NormImpl = Literal["auto", "xla", "pallas"]
DTypeName = Literal["float32", "bfloat16"]
RopeType = Literal["default", "linear", "dynamic", "yarn", "llama3"]
Activation = Literal["silu", "gelu_tanh"]
MatmulPrecision = Literal["bf16", "fp8"]
MoeImpl = Literal["auto", "xla", "pallas"]
Router = Literal["softmax_topk", "sigmoid_topk"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: pre-norm RMSNorm blocks, RoPE, GQA attention, gated MLP.

    dtype is the compute dtype (matmul inputs and activations); param_dtype is how
    parameters are stored (cast to dtype at use). Logits and softmax are always fp32.

    The fields after `norm_impl` are what Llama 3, Qwen 2/3, Mistral and Gemma 2/3 add
    to the plain decoder; their defaults are the plain Llama, and each is read in one
    place (models/rope.py for the rope_* fields, models/llama/model.py for the rest):
    - rope_type (transformers' names) with rope_factor; llama3 reads rope_low_freq_factor,
      rope_high_freq_factor and rope_original_context; yarn reads rope_original_context,
      rope_beta_fast, rope_beta_slow and rope_attention_factor (0: 0.1 ln(factor) + 1);
      dynamic (NTK) rescales the base for rows longer than rope_original_context.
    - qkv_bias, o_bias: biases of the q/k/v and output projections (Qwen 2: qkv only).
    - qk_norm: an RMSNorm over head_dim on q and k before RoPE (Qwen 3, Gemma 3).
    - sliding_window W > 0: a query sees itself and the W - 1 tokens before it; with
      global_every N > 0 every N-th layer (i + 1 divisible by N) sees everything
      (Gemma 2: N = 2, Gemma 3: N = 6), otherwise every layer is windowed (Mistral).
      local_rope_theta > 0 gives windowed layers plain RoPE of that base (Gemma 3).
    - Gemma: activation 'gelu_tanh' (GeGLU), norm_plus_one (RMSNorm scales by 1 + w),
      embed_scale (embeddings times sqrt(hidden_size)), sandwich_norms (a norm after
      attention and after the MLP, before each residual add), query_pre_attn_scalar
      (scores scaled by its -1/2 power instead of head_dim's), attn_softcap and
      final_softcap (c * tanh(x / c) on attention scores and on logits; 0: off).
    - Mixture of Experts (models/moe.py; Mixtral, Qwen 3 MoE, DeepSeek V3): num_experts > 0
      replaces the MLP of every layer from first_dense_layers on by experts_per_token of
      num_experts SwiGLU experts of moe_intermediate_size (0: intermediate_size), plus
      shared_experts always-on experts of that size; router 'softmax_topk' (softmax, top k,
      renormalized when norm_topk_prob) or 'sigmoid_topk' (sigmoid scores, top k, normalized),
      weights times routed_scaling; capacity_factor > 0 drops assignments beyond
      ceil(factor x tokens x k / num_experts) per expert, 0 is dropless. router_bias_update u > 0:
      DeepSeek V3's auxiliary-loss-free balancing, a per-expert bias added to the scores for the
      top-k choice only (never to the weights). router_groups G > 0 with router_topk_groups g:
      DeepSeek V3's group-limited routing, experts in G equal groups, each token choosing among
      the experts of its g best groups only (a group's score: the sum of its two best choice
      scores), moved by u x sign(mean load - load) after each
      applied step from the global batch's loads (train/step.py).

    matmul_precision (last, so a default one is left out of `record`): 'bf16' runs every
    projection of the decoder layers in `dtype`; 'fp8' runs them as FP8 GEMMs (models/fp8.py:
    E4M3 forward, E5M2 gradients, per-tensor current scaling). How to compute, not what is
    stored: a checkpoint restores under either. The output head stays in `dtype`.

    moe_impl (after it, set from the config's `moe.impl`): how a dropless expert layer runs its
    grouped matmuls, `jax.lax.ragged_dot` ('auto', 'xla') or the Pallas kernel ('pallas'). How to
    compute, not what is stored.
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
    rope_type: RopeType = "default"
    rope_factor: float = 1.0
    rope_original_context: int = 0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 0.0
    local_rope_theta: float = 0.0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0
    global_every: int = 0
    activation: Activation = "silu"
    norm_plus_one: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    num_experts: int = 0
    experts_per_token: int = 2
    moe_intermediate_size: int = 0
    shared_experts: int = 0
    first_dense_layers: int = 0
    router: Router = "softmax_topk"
    norm_topk_prob: bool = True
    routed_scaling: float = 1.0
    capacity_factor: float = 0.0
    router_bias_update: float = 0.0
    router_groups: int = 0
    router_topk_groups: int = 0
    matmul_precision: MatmulPrecision = "bf16"
    moe_impl: MoeImpl = "auto"

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
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe.impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ConfigError(f"model.{name} must be one of {DTYPE_NAMES}, got {getattr(self, name)!r}")
        problem = family_problem(self)
        if problem:
            raise ConfigError(problem)
        problem = matmul_precision_problem(self)
        if problem:
            raise ConfigError(problem)

    def record(self) -> dict[str, Any]:
        """The fields a checkpoint's metadata records: every field, except family fields
        (those after norm_impl) left at their defaults, so a plain Llama's record is what
        it was before the families existed and older checkpoints still match it."""
        fields = dataclasses.fields(self)
        first_family = [f.name for f in fields].index("rope_type")
        return {f.name: getattr(self, f.name) for i, f in enumerate(fields)
                if i < first_family or getattr(self, f.name) != f.default}

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has experts instead of the dense MLP."""
        return is_moe_layer(self, layer)

    @property
    def expert_size(self) -> int:
        """One expert's intermediate size."""
        return self.moe_intermediate_size or self.intermediate_size

    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's sliding window (0: the layer sees every earlier token)."""
        return tuple(layer_window(self, i) for i in range(self.num_layers))

    @classmethod
    def from_config_dict(cls, cfg: Any, attention_impl: str | None = None,
                         norm_impl: str | None = None, moe_impl: str | None = None) -> ModelConfig:
        """Builds from a ConfigDict (or mapping) whose keys are this class's field names.

        Missing optional fields take their defaults; unknown keys are an error, so a typo
        in a config file cannot silently fall back to a default. `attention_impl`,
        `norm_impl` and `moe_impl`, when given, override the ones in `cfg` (they live
        elsewhere in the config: attention.impl, norm.impl, moe.impl).
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
        if moe_impl is not None:
            values["moe_impl"] = moe_impl
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
        the output projection (an MoE layer counts its router, its shared experts and
        experts_per_token routed experts: the active parameters) (the embedding matrix itself when tied). The embedding
        lookup and the norm scales do no matmul FLOPs and are excluded. Each matmul
        parameter costs 2 FLOPs forward and 4 backward per token, hence 6.

        Attention scores and the weighted sum each cost 2 * H * head_dim * seq_len FLOPs
        per token and layer forward, times 3 for the backward: 12 * L * H * head_dim *
        seq_len; causal masking halves it on average (each query sees half the keys).
        Segment masking of packed documents is not counted (it depends on the data).
        A windowed layer's query sees min(position + 1, window) keys, on average
        window - window^2 / (2 seq_len) when the window is shorter than the sequence.
        """
        n_matmul = sum(layer_matmul_params(self, i, active=True) for i in range(self.num_layers))
        n_matmul += self.vocab_size * self.hidden_size
        keys = sum(seq_len / 2 if not w or w >= seq_len else w - w * w / (2 * seq_len)
                   for w in self.layer_windows())
        attention = int(12 * self.num_heads * self.head_dim * keys)
        return 6 * n_matmul + attention


def layer_window(model: Any, layer: int) -> int:
    """Layer `layer`'s sliding window (0: none): model.sliding_window, except on every
    global_every-th layer."""
    if model.sliding_window <= 0:
        return 0
    if model.global_every > 0 and (layer + 1) % model.global_every == 0:
        return 0
    return model.sliding_window


def family_problem(model: Any) -> str | None:
    """Why the family fields of `model` (a ModelConfig or the config's model section) do
    not make a model, as one line naming the field; None if they do. config.validate and
    ModelConfig share it."""
    if model.rope_type not in ROPE_TYPES:
        return f"model.rope_type: {model.rope_type!r} is not one of {', '.join(map(repr, ROPE_TYPES))}"
    if model.activation not in ACTIVATIONS:
        return f"model.activation: {model.activation!r} is not one of {', '.join(map(repr, ACTIVATIONS))}"
    for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow"):
        value = getattr(model, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            return f"model.{name}: {value!r} must be a finite number > 0"
    for name in ("rope_attention_factor", "local_rope_theta", "query_pre_attn_scalar", "attn_softcap",
                 "final_softcap"):
        value = getattr(model, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            return f"model.{name}: {value!r} must be a finite number >= 0 (0: off)"
    for name in ("rope_original_context", "sliding_window", "global_every"):
        value = getattr(model, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"model.{name}: {value!r} must be an integer >= 0 (0: off)"
    if model.rope_type != "default" and model.rope_factor < 1:
        return f"model.rope_factor: {model.rope_factor} must be >= 1 for rope_type {model.rope_type!r}"
    if model.rope_type in ("llama3", "yarn", "dynamic") and not model.rope_original_context:
        return (f"model.rope_original_context: rope_type {model.rope_type!r} needs the context length the "
                "model was trained at (> 0)")
    if model.rope_type == "llama3" and model.rope_high_freq_factor <= model.rope_low_freq_factor:
        return (f"model.rope_high_freq_factor: {model.rope_high_freq_factor} must exceed "
                f"model.rope_low_freq_factor={model.rope_low_freq_factor}")
    if model.rope_type == "dynamic" and model.head_dim <= 2:
        return "model.head_dim: rope_type 'dynamic' needs head_dim > 2"
    if model.global_every and not model.sliding_window:
        return "model.global_every: set only with model.sliding_window > 0 (it picks the unwindowed layers)"
    if model.local_rope_theta and not model.sliding_window:
        return "model.local_rope_theta: set only with model.sliding_window > 0 (windowed layers use it)"
    return moe_problem(model)


def moe_problem(model: Any) -> str | None:
    """Why the Mixture-of-Experts fields of `model` do not make a model, as one line; None if they do."""
    for name in ("num_experts", "moe_intermediate_size", "shared_experts", "first_dense_layers", "router_groups",
                 "router_topk_groups"):
        value = getattr(model, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"model.{name}: {value!r} must be an integer >= 0"
    if model.router not in ROUTERS:
        return f"model.router: {model.router!r} is not one of {', '.join(map(repr, ROUTERS))}"
    for name in ("routed_scaling", "capacity_factor", "router_bias_update"):
        value = getattr(model, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            return f"model.{name}: {value!r} must be a finite number >= 0"
    if not model.num_experts:
        return None
    k = model.experts_per_token
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= model.num_experts:
        return f"model.experts_per_token: {k!r} must be an integer from 1 to model.num_experts={model.num_experts}"
    if model.routed_scaling <= 0:
        return f"model.routed_scaling: {model.routed_scaling} must be > 0 with experts"
    problem = router_groups_problem(model)
    if problem:
        return problem
    if model.first_dense_layers >= model.num_layers:
        return (f"model.first_dense_layers: {model.first_dense_layers} leaves no MoE layer among "
                f"model.num_layers={model.num_layers}")
    if model.first_dense_layers and model.scan_layers:
        return ("model.first_dense_layers: dense and MoE layers differ in structure, and a scan runs one "
                "structure; set model.scan_layers=False with it (or 0: every layer MoE)")
    return None


def router_groups_problem(model: Any) -> str | None:
    """Why the group-limited routing fields of an MoE `model` do not fit, as one line; None if they do."""
    groups, keep = model.router_groups, model.router_topk_groups
    if not groups:
        return "model.router_topk_groups: set only with model.router_groups > 0" if keep else None
    if model.num_experts % groups:
        return f"model.router_groups: {groups} must divide model.num_experts={model.num_experts}"
    if not 1 <= keep <= groups:
        return f"model.router_topk_groups: {keep} must be an integer from 1 to model.router_groups={groups}"
    if model.experts_per_token > keep * (model.num_experts // groups):
        return (f"model.experts_per_token: {model.experts_per_token} exceeds the experts of "
                f"model.router_topk_groups={keep} groups ({keep * (model.num_experts // groups)})")
    return None


def matmul_precision_problem(model: Any) -> str | None:
    """Why `model.matmul_precision` does not fit the other model fields, as one line; None if it does.

    FP8 GEMMs (cuBLASLt on H100/H200) take bf16-era inputs and need every matmul dimension
    a multiple of 16; an fp32 model has no business mixing in 3-bit-mantissa matmuls.
    """
    if model.matmul_precision not in MATMUL_PRECISIONS:
        return f"model.matmul_precision: {model.matmul_precision!r} is not one of {', '.join(map(repr, MATMUL_PRECISIONS))}"
    if model.matmul_precision != "fp8":
        return None
    if model.dtype != "bfloat16":
        return f"model.matmul_precision: 'fp8' needs model.dtype='bfloat16' (got {model.dtype!r})"
    sizes = {"hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
             "num_heads x head_dim": model.num_heads * model.head_dim,
             "num_kv_heads x head_dim": model.num_kv_heads * model.head_dim}
    odd = [f"{name}={value}" for name, value in sizes.items() if value % 16]
    if odd:
        return f"model.matmul_precision: 'fp8' GEMMs need multiples of 16; {', '.join(odd)} are not"
    return None


def is_moe_layer(model: Any, layer: int) -> bool:
    """Layer `layer` has experts: the model has experts and the layer is past the dense ones."""
    return model.num_experts > 0 and layer >= model.first_dense_layers


def layer_matmul_params(model: Any, layer: int = 0, active: bool = False) -> int:
    """Parameters of decoder block `layer`'s matmuls: q, o, k, v and the gated MLP's gate, up,
    down, or an MoE layer's router, shared and routed experts (with `active`, only the
    experts_per_token routed experts a token uses)."""
    e, d = model.hidden_size, model.head_dim
    attention = e * d * (2 * model.num_heads + 2 * model.num_kv_heads)
    if not is_moe_layer(model, layer):
        return attention + 3 * e * model.intermediate_size
    expert = 3 * e * (model.moe_intermediate_size or model.intermediate_size)
    routed = model.experts_per_token if active else model.num_experts
    return attention + e * model.num_experts + (routed + model.shared_experts) * expert


def parameter_count(model: Any) -> int:
    """Exact parameter count of a Llama with `model`'s fields (a ModelConfig, or the run config's
    `model` section, which config.validate sizes before any ModelConfig exists), in Python ints."""
    e, d = model.hidden_size, model.head_dim
    norms = 4 if model.sandwich_norms else 2
    per_layer = norms * e
    per_layer += (model.num_heads + 2 * model.num_kv_heads) * d if model.qkv_bias else 0
    per_layer += e if model.o_bias else 0
    per_layer += 2 * d if model.qk_norm else 0
    embeddings = model.vocab_size * e * (1 if model.tie_embeddings else 2)
    layers = sum(layer_matmul_params(model, i) for i in range(model.num_layers))
    if model.num_experts and model.router_bias_update:  # the selection bias of each MoE layer
        layers += model.num_experts * sum(is_moe_layer(model, i) for i in range(model.num_layers))
    return embeddings + layers + model.num_layers * per_layer + e  # + final norm
