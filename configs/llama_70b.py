"""llama_70b: the Llama 3.1 70B architecture (70.6B parameters).

80 layers, hidden 8192, 64 query heads and 8 key/value heads of 128, SwiGLU 28672,
untied embeddings over a 128256-entry vocabulary, RoPE theta 500000. For real
clusters and for sizing: ZeRO-3 with tensor parallelism inside a node.

    efficient-train estimate --config configs/llama_70b.py --config.mesh.data=8 --config.mesh.tensor=8
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.zero_stage = 3
    c.model.update(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, tie_embeddings=False, dtype="bfloat16",
        remat="full",
    )
    c.train.update(steps=10000, batch_size=512, grad_accum=16, learning_rate=1.5e-4, warmup_steps=2000)
    c.data.seq_len = 4096
    return c
