"""qwen3_8b: the Qwen 3 8B architecture (8.19B parameters).

36 layers, hidden 4096, 32 query heads and 8 key/value heads of 128 with an RMSNorm on
each q and k head before RoPE, SwiGLU 12288, untied embeddings over 151936 tokens, RoPE
theta 1e6. ZeRO-3 with full rematerialization, as llama_8b.

    efficient-train estimate --config configs/qwen3_8b.py --devices 8 --config.mesh.data=8
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.zero_stage = 3
    c.model.update(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=False,
        qk_norm=True, dtype="bfloat16", remat="full",
    )
    c.train.update(steps=10000, batch_size=64, grad_accum=4, learning_rate=3e-4, warmup_steps=1000)
    c.data.seq_len = 4096
    return c
