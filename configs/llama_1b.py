"""llama_1b: the Llama 3.2 1B architecture (1.24B parameters).

16 layers, hidden 2048, 32 query heads and 8 key/value heads of 64, SwiGLU 8192,
tied embeddings over a 128256-entry vocabulary, RoPE theta 500000. bf16 compute,
fp32 master weights, ZeRO-1 over one node.

    efficient-train train --config configs/llama_1b.py --config.mesh.data=8 --workdir runs/llama_1b
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.model.update(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16",
        remat="save_dots",
    )
    c.train.update(steps=10000, batch_size=64, learning_rate=3e-4, warmup_steps=500)
    c.data.seq_len = 2048
    return c
