"""Hugging Face config.json <-> `ModelConfig`, for Llama 3.x, Qwen 2/2.5, Qwen 3, Mistral, Gemma 2/3,
and the Mixture-of-Experts Mixtral and Qwen 3 MoE.

- `config_from_hf` reads a config.json dict of one of `MODEL_TYPES`. Every field that
  changes what the model computes is read or refused: a value our model cannot
  compute (another activation, MLP biases, a RoPE scaling we do not implement, Qwen's
  bottom-up sliding layers, bidirectional Gemma attention, quantized weights) is one
  HFError line naming the field and what is allowed, never silently dropped, because
  the loaded model would otherwise produce other logits. Both the transformers 4 keys
  (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `torch_dtype`) and the
  transformers 5 ones (`rope_parameters`, per layer type for Gemma 3, `dtype`) are read.
- `config_to_hf` writes the config.json of the family `hf_family` recognizes from the
  fields, in both generations of keys, and refuses a combination of fields that no
  family computes (it checks that the written config reads back to the same model).
- Family defaults: a key a config.json leaves out takes the value of that family's
  transformers config class (`FAMILY_DEFAULTS`), as transformers itself would.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from efficient_train.checkpoint.metadata import COMPUTE_FIELDS
from efficient_train.models import ModelConfig
from efficient_train.models.llama.hf_names import moe_family
from efficient_train.tools.safetensors import HFError

CONFIG_FILE = "config.json"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE_TYPES = ("mixtral", "qwen3_moe")
GEMMA = ("gemma2", "gemma3_text")
# transformers' defaults (its config classes) for keys a config.json may leave out.
COMMON_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": None,
                   "head_dim": None, "attention_bias": False}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {"sliding_window": 4096},
    "qwen3": {"sliding_window": 4096, "head_dim": 128},
    "gemma2": {"sliding_window": 4096, "head_dim": 256, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window_pattern": 2},
    "gemma3_text": {"sliding_window": 4096, "head_dim": 256, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                    "final_logit_softcapping": None, "attn_logit_softcapping": None, "sliding_window_pattern": 6,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
    "mixtral": {"rope_theta": 1_000_000.0, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "moe_intermediate_size": 768},
}
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "truncate",
             "mscale", "mscale_all_dim", "partial_rotary_factor"}
SLIDING, FULL = "sliding_attention", "full_attention"


def _refuse(field: str, value: Any, allowed: str) -> HFError:
    text = repr(value)
    return HFError(f"{CONFIG_FILE}: {field}={text[:200] + '...' if len(text) > 200 else text} is not supported; "
                   f"allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any, field: str, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if not _is_int(value) or value <= 0:
        raise _refuse(field, value, "a positive integer" + (" or null" if nullable else ""))
    return value


def _positive_number(value: Any, field: str) -> float:
    if not _number(value) or value <= 0:
        raise _refuse(field, value, "a positive number")
    return float(value)


class _Fields:
    """A config.json dict with its family's defaults for the keys it leaves out."""

    def __init__(self, hf: dict, model_type: str) -> None:
        self.hf, self.defaults = hf, {**COMMON_DEFAULTS, **FAMILY_DEFAULTS[model_type]}

    def __contains__(self, key: str) -> bool:
        return key in self.hf

    def get(self, key: str) -> Any:
        return self.hf[key] if key in self.hf else self.defaults.get(key)


def _rope_parameters(f: _Fields, model_type: str) -> tuple[dict, float | None]:
    """The global layers' RoPE parameters (one dict, theta included) and, for Gemma 3,
    the local layers' theta; from either generation of keys."""
    parameters = f.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _refuse("rope_parameters", parameters, "null or an object")
    local_theta = None
    if model_type == "gemma3_text":
        local_theta = f.get("rope_local_base_freq")
        if parameters and (SLIDING in parameters or FULL in parameters):
            local = parameters.get(SLIDING) or {}
            if not isinstance(local, dict) or local.get("rope_type", "default") != "default" \
                    or set(local) - {"rope_type", "rope_theta"}:
                raise _refuse(f"rope_parameters.{SLIDING}", local, "plain RoPE ({'rope_type': 'default', "
                              "'rope_theta': ...}) on the sliding-window layers")
            local_theta = local.get("rope_theta", local_theta)
            parameters = parameters.get(FULL) or {}
            if not isinstance(parameters, dict):
                raise _refuse(f"rope_parameters.{FULL}", parameters, "an object")
        local_theta = _positive_number(local_theta, "rope_local_base_freq")
    scaling = f.get("rope_scaling")  # transformers 4
    if scaling is not None and not isinstance(scaling, dict):
        raise _refuse("rope_scaling", scaling, "null or an object")
    return dict(parameters or scaling or {}), local_theta


def _rope(f: _Fields, model_type: str) -> dict[str, Any]:
    """ModelConfig's rope_* fields (and local_rope_theta)."""
    parameters, local_theta = _rope_parameters(f, model_type)
    field = "rope_parameters" if "rope_parameters" in f and f.get("rope_parameters") else "rope_scaling"
    unknown = sorted(set(parameters) - ROPE_KEYS)
    if unknown:
        raise _refuse(f"{field}.{unknown[0]}", parameters[unknown[0]], f"only the keys {', '.join(sorted(ROPE_KEYS))}")
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise _refuse(f"{field}.rope_type", kind, "'default', 'linear', 'dynamic', 'yarn' or 'llama3'")
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(f"{field}.partial_rotary_factor", parameters["partial_rotary_factor"], "1.0 (RoPE on the whole head)")
    if parameters.get("mscale") or parameters.get("mscale_all_dim"):
        raise _refuse(f"{field}.mscale", parameters.get("mscale"), "absent (yarn's attention factor from its factor, "
                      "or attention_factor)")
    if parameters.get("truncate", True) is not True:
        raise _refuse(f"{field}.truncate", parameters["truncate"], "true (yarn's rounded correction range)")
    theta = parameters.get("rope_theta")
    out: dict[str, Any] = {"rope_type": kind, "rope_theta": _positive_number(f.get("rope_theta"), "rope_theta")
                           if theta is None else _positive_number(theta, f"{field}.rope_theta")}
    if local_theta is not None:
        out["local_rope_theta"] = local_theta
    if kind == "default":
        return out
    max_positions = f.get("max_position_embeddings")
    factor = parameters.get("factor")
    if kind == "yarn":
        original = parameters.get("original_max_position_embeddings") or max_positions
        out["rope_original_context"] = _positive_int(original, f"{field}.original_max_position_embeddings")
        if factor is None and _is_int(max_positions):
            factor = max_positions / original
        if parameters.get("attention_factor") is not None:
            out["rope_attention_factor"] = _positive_number(parameters["attention_factor"],
                                                            f"{field}.attention_factor")
        for key, name in (("beta_fast", "rope_beta_fast"), ("beta_slow", "rope_beta_slow")):
            if parameters.get(key):  # transformers: `or` the default (32, 1)
                out[name] = _positive_number(parameters[key], f"{field}.{key}")
    elif kind == "llama3":
        out["rope_original_context"] = _positive_int(parameters.get("original_max_position_embeddings"),
                                                     f"{field}.original_max_position_embeddings")
        out["rope_low_freq_factor"] = _positive_number(parameters.get("low_freq_factor"), f"{field}.low_freq_factor")
        out["rope_high_freq_factor"] = _positive_number(parameters.get("high_freq_factor"),
                                                        f"{field}.high_freq_factor")
    elif kind == "dynamic":
        out["rope_original_context"] = _positive_int(max_positions, "max_position_embeddings")
    out["rope_factor"] = _positive_number(factor, f"{field}.factor")
    return out


def _windows(f: _Fields, model_type: str, num_layers: int) -> dict[str, Any]:
    """sliding_window and global_every from the family's window fields."""
    window = f.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        if f.get("use_sliding_window"):
            raise _refuse("use_sliding_window", f.get("use_sliding_window"),
                          "false (Qwen's windowed upper layers are not supported)")
        types = f.get("layer_types")
        if types is not None and any(t != FULL for t in types):
            raise _refuse("layer_types", types, f"every layer {FULL!r}")
        return {}
    if window is None:
        return {}
    window = _positive_int(window, "sliding_window")
    if model_type in ("mistral", "mixtral"):
        return {"sliding_window": window}
    if model_type not in GEMMA:  # llama has no window
        raise _refuse("sliding_window", window, "null (full causal attention)")
    if f.get("use_bidirectional_attention"):
        raise _refuse("use_bidirectional_attention", True, "false (causal attention)")
    pattern = f.get("sliding_window_pattern")
    types = f.get("layer_types")
    if types is None:
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
        raise _refuse("layer_types", types, f"a list of {num_layers} {SLIDING!r} / {FULL!r}")
    candidates = [pattern] + list(range(1, num_layers + 1))
    for every in candidates:
        if _is_int(every) and every > 0 and types == [SLIDING if (i + 1) % every else FULL for i in range(num_layers)]:
            if every == 1:  # every layer global
                return {}
            return {"sliding_window": window, "global_every": every if every <= num_layers else 0}
    if all(t == SLIDING for t in types):
        return {"sliding_window": window}
    raise _refuse("layer_types", types, "every N-th layer full_attention and the others sliding_attention")


def config_from_hf(hf: dict) -> ModelConfig:
    """The `ModelConfig` of a HF config.json dict; refuses what the model cannot compute,
    and any field of the wrong type or out of range, naming it and what is allowed."""
    if not isinstance(hf, dict):
        raise HFError(f"{CONFIG_FILE}: is a {type(hf).__name__}; allowed: a JSON object")
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise _refuse("model_type", model_type, " or ".join(map(repr, MODEL_TYPES)))
    f = _Fields(hf, model_type)
    gemma = model_type in GEMMA
    activation_field = "hidden_activation" if gemma else "hidden_act"
    activation = f.get(activation_field) or ("gelu_pytorch_tanh" if gemma else "silu")
    allowed_activation = "gelu_pytorch_tanh" if gemma else "silu"
    if activation != allowed_activation:
        raise _refuse(activation_field, activation, f"{allowed_activation!r} (the gated MLP of {model_type})")
    if f.get("mlp_bias"):
        raise _refuse("mlp_bias", f.get("mlp_bias"), "false (bias-free MLP)")
    bias = f.get("attention_bias")
    if not isinstance(bias, bool):
        raise _refuse("attention_bias", bias, "true or false")
    if bias and model_type in ("mistral", "qwen2"):
        raise _refuse("attention_bias", bias, f"false ({model_type} fixes its projection biases)")
    if f.get("quantization_config") is not None:
        raise _refuse("quantization_config", f.get("quantization_config"), "absent (plain float weights)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if field not in f:
            raise HFError(f"{CONFIG_FILE}: {field} is missing")
        _positive_int(f.get(field), field)
    heads, layers = f.get("num_attention_heads"), f.get("num_hidden_layers")
    tie = f.get("tie_word_embeddings")
    if not isinstance(tie, bool):
        raise _refuse("tie_word_embeddings", tie, "true or false")
    family: dict[str, Any] = {"qkv_bias": bias or model_type == "qwen2", "o_bias": bias,
                              "qk_norm": model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
                              **_rope(f, model_type), **_windows(f, model_type, layers)}
    if model_type in MOE_TYPES:
        family.update(_experts(f, model_type))
    if gemma:
        scalar = f.get("query_pre_attn_scalar")
        family.update(activation="gelu_tanh", norm_plus_one=True, embed_scale=True, sandwich_norms=True,
                      query_pre_attn_scalar=_positive_number(scalar, "query_pre_attn_scalar"))
        for hf_field, field in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
            cap = f.get(hf_field)
            family[field] = 0.0 if cap is None else _positive_number(cap, hf_field)
    try:
        return ModelConfig(
            vocab_size=f.get("vocab_size"),
            hidden_size=f.get("hidden_size"),
            intermediate_size=f.get("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_positive_int(f.get("num_key_value_heads"), "num_key_value_heads", nullable=True) or heads,
            head_dim=_positive_int(f.get("head_dim"), "head_dim", nullable=True) or f.get("hidden_size") // heads,
            rms_norm_eps=_positive_number(f.get("rms_norm_eps"), "rms_norm_eps"),
            tie_embeddings=tie,
            **family,
        )
    except ValueError as error:  # ModelConfig's own validation, already one line
        raise HFError(f"{CONFIG_FILE}: {error}") from None


def _experts(f: _Fields, model_type: str) -> dict[str, Any]:
    """ModelConfig's MoE fields: Mixtral (softmax top-k renormalized, experts of intermediate_size) or
    Qwen 3 MoE (norm_topk_prob as given, experts of moe_intermediate_size, every layer sparse)."""
    key = "num_local_experts" if model_type == "mixtral" or "num_experts" not in f else "num_experts"
    experts = _positive_int(f.get(key), key)
    k = _positive_int(f.get("num_experts_per_tok"), "num_experts_per_tok")
    out: dict[str, Any] = {"num_experts": experts, "experts_per_token": k, "router": "softmax_topk"}
    if model_type == "mixtral":
        return out | {"norm_topk_prob": True}
    if f.get("decoder_sparse_step") != 1:
        raise _refuse("decoder_sparse_step", f.get("decoder_sparse_step"), "1 (every layer has experts)")
    if f.get("mlp_only_layers"):
        raise _refuse("mlp_only_layers", f.get("mlp_only_layers"), "[] (every layer has experts)")
    norm = f.get("norm_topk_prob")
    if not isinstance(norm, bool):
        raise _refuse("norm_topk_prob", norm, "true or false")
    size = _positive_int(f.get("moe_intermediate_size"), "moe_intermediate_size")
    return out | {"norm_topk_prob": norm, "moe_intermediate_size": size}


def hf_family(cfg: ModelConfig) -> str:
    """The HF model_type whose architecture computes `cfg` (checked by `config_to_hf`)."""
    if cfg.num_experts:
        return moe_family(cfg.qk_norm)
    if cfg.sandwich_norms:
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.o_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    parameters: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        parameters["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        parameters.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                          original_max_position_embeddings=cfg.rope_original_context)
    if cfg.rope_type == "yarn":
        parameters.update(original_max_position_embeddings=cfg.rope_original_context, beta_fast=cfg.rope_beta_fast,
                          beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attention_factor:
            parameters["attention_factor"] = cfg.rope_attention_factor
    return parameters


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict:
    """config.json for `cfg`; `dtype` (default: cfg.param_dtype) names the stored weights."""
    dtype = dtype or cfg.param_dtype
    model_type = hf_family(cfg)
    gemma = model_type in GEMMA
    rope = _rope_to_hf(cfg)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_type != "default" else None
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        ("hidden_activation" if gemma else "hidden_act"): "gelu_pytorch_tanh" if gemma else "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_scaling": scaling,  # transformers 4
        "rope_parameters": rope,  # transformers 5
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,  # transformers 4
        "dtype": dtype,  # transformers 5
    }
    if cfg.rope_original_context and cfg.rope_type == "dynamic":
        out["max_position_embeddings"] = cfg.rope_original_context
    if model_type not in ("mistral", "qwen2"):
        out["attention_bias"] = cfg.qkv_bias
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        out.update(use_sliding_window=False, layer_types=[FULL] * cfg.num_layers)
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.sliding_window or None
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                   router_jitter_noise=0.0)
        if cfg.moe_intermediate_size:  # Mixtral's experts are of intermediate_size
            out["intermediate_size"] = cfg.moe_intermediate_size
    if model_type == "qwen3_moe":
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                   norm_topk_prob=cfg.norm_topk_prob, moe_intermediate_size=cfg.expert_size,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if gemma:
        windows = cfg.layer_windows()
        if not float(cfg.query_pre_attn_scalar).is_integer():  # transformers holds an int
            raise HFError(f"model.query_pre_attn_scalar: {cfg.query_pre_attn_scalar} is not an integer, which "
                          f"{model_type}'s config.json requires")
        out.update(sliding_window=cfg.sliding_window or None, query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
                   attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None,
                   layer_types=[SLIDING if w else FULL for w in windows], use_bidirectional_attention=False)
        if cfg.global_every:
            out["sliding_window_pattern"] = cfg.global_every
    if model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
        out["rope_parameters"] = {FULL: rope, SLIDING: local}
        out["rope_local_base_freq"] = local["rope_theta"]
    stored = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in STORED_MODEL_FIELDS}
    try:
        back = config_from_hf(out)
    except HFError as error:
        raise HFError(f"model: no Hugging Face architecture computes this model ({error})") from None
    differing = [name for name, value in stored.items() if getattr(back, name) != value]
    if differing:
        raise HFError(f"model: no Hugging Face architecture computes this model: as {model_type} it would change "
                      f"{', '.join('model.' + name for name in differing)}")
    return out


# The ModelConfig fields config.json holds (everything but how to compute and store).
STORED_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in COMPUTE_FIELDS | {
    "scan_layers", "param_dtype", "capacity_factor"})
