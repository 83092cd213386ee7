"""The model's allowed values: remat policies, attention and norm implementations, dtypes,
RoPE scalings, MLP activations, matmul precisions, LoRA targets and Mixture-of-Experts routers. Plain
names, no imports.

`ModelConfig`, the attention dispatch and `RMSNorm` check against these, and
`config.validate` refuses the same values by field name before jax starts, so they
live in a module that loads nothing. Every model family shares them.
"""
from __future__ import annotations

# What each keeps for the backward is in models/remat.py; offload_* keep the same set as
# their save_* twin, in pinned host memory instead of device memory.
REMAT_POLICIES = ("none", "save_dots", "save_attention", "save_qkv", "full",
                  "offload_dots", "offload_attention", "offload_qkv")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
NORM_IMPLS = ("auto", "xla", "pallas")
DTYPES = ("float32", "bfloat16")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # transformers' rope_type names
ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama, Qwen, Mistral), GeGLU with tanh gelu (Gemma)
# LoRA targets (finetune.lora.targets): the projections by their short names, and the token embedding.
LORA_LINEAR_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_TARGETS = (*LORA_LINEAR_TARGETS, "embed")
MATMUL_PRECISIONS = ("bf16", "fp8")  # the decoder layers' projections: model.dtype, or FP8 (models/fp8.py)
ROUTERS = ("softmax_topk", "sigmoid_topk")  # Mixtral / Qwen MoE; DeepSeek V3 (normalized sigmoid scores)
# How a dropless MoE layer computes its grouped matmul: auto (= xla for now), xla (jax.lax.ragged_dot),
# pallas (pallas_kernels.grouped_matmul: Triton on NVIDIA GPUs, the interpreter on a CPU).
MOE_IMPLS = ("auto", "xla", "pallas")
MOE_BALANCE_SCOPES = ("global", "micro_batch")  # expert frequencies of the balance loss (train/moe_balance.py)
