"""mistral_7b: the Mistral 7B (v0.1) architecture (7.24B parameters).

32 layers, hidden 4096, 32 query heads and 8 key/value heads of 128, SwiGLU 14336,
untied embeddings over 32000 tokens, RoPE theta 10000, and a sliding window of 4096
tokens on every layer (which only bites on sequences longer than the window; the
Pallas kernel then skips the key blocks behind it). ZeRO-3, full rematerialization.

    efficient-train estimate --config configs/mistral_7b.py --devices 8 --config.mesh.data=8
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.zero_stage = 3
    c.model.update(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False,
        sliding_window=4096, dtype="bfloat16", remat="full",
    )
    c.train.update(steps=10000, batch_size=64, grad_accum=4, learning_rate=3e-4, warmup_steps=1000)
    c.data.seq_len = 8192
    return c
