"""llama_8b: the Llama 3.1 8B architecture (8.03B parameters).

32 layers, hidden 4096, 32 query heads and 8 key/value heads of 128, SwiGLU 14336,
untied embeddings over a 128256-entry vocabulary, RoPE theta 500000 with Llama 3.1's
'llama3' scaling (factor 8 beyond the original 8192 tokens). For real clusters and for
sizing: ZeRO-3 with full rematerialization. `import-hf` of meta-llama/Llama-3.1-8B
prints exactly these model fields.

    efficient-train estimate --config configs/llama_8b.py --config.mesh.data=8
    efficient-train train --config configs/llama_8b.py --config.mesh.data=8 --workdir runs/llama_8b
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.zero_stage = 3
    c.model.update(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, tie_embeddings=False, dtype="bfloat16",
        remat="full", rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_context=8192,
    )
    c.train.update(steps=10000, batch_size=64, grad_accum=4, learning_rate=3e-4, warmup_steps=1000)
    c.data.seq_len = 4096
    return c
