"""LoRA on Llama 3.1 8B: rank-16 adapters on every projection over a frozen bf16 base, one GPU.

The model is configs/llama_8b.py's (loaded from it, so the two never drift apart) with bf16
weights: the base is frozen, so it needs no fp32 master copy. `finetune.base` is the
`checkpoint import-hf` output of meta-llama/Llama-3.1-8B (import it with --param_dtype
bfloat16). Only the adapters (42M parameters) have gradients and AdamW states.

    efficient-train checkpoint import-hf Llama-3.1-8B/ ckpt/llama31_8b --param_dtype bfloat16
    efficient-train estimate --config configs/lora_llama3_8b.py
    efficient-train train --config configs/lora_llama3_8b.py --config.finetune.base=ckpt/llama31_8b \\
        --config.data.source=prepared --config.data.path=DATA --config.data.tokenizer=ckpt/llama31_8b/tokenizer
"""
import os

from efficient_train.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_8b.py"))
    c.workdir = "runs/lora_llama3_8b"
    c.zero_stage = 0  # one device: nothing to shard
    c.mesh.data = 1
    c.model.param_dtype = "bfloat16"
    c.finetune.base = "ckpt/llama31_8b"
    c.finetune.lora.update(dict(rank=16, alpha=32.0, dropout=0.05, targets="q,k,v,o,gate,up,down"))
    c.train.update(dict(steps=1000, batch_size=8, grad_accum=8, learning_rate=2e-4, warmup_steps=30))
    c.optimizer.weight_decay = 0.0
    c.data.seq_len = 4096
    return c
