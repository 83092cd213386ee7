"""gpt2_small: a GPT-2-small-sized (~124M parameters) Llama-family model.

12 layers, hidden 768, 12 heads of 64, tied embeddings over a 50304-entry vocabulary
(GPT-2's 50257 padded to a multiple of 64); the SwiGLU MLP's 2048 hidden units give
the same MLP parameter count as GPT-2's 3072-wide GELU MLP. Byte-level text by default;
point data.source=tokens at a GPT-2-tokenized file for the real thing.

    efficient-train train --config configs/gpt2_small.py --config.mesh.data=8 --workdir runs/gpt2
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.model.update(
        vocab_size=50304, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
        num_kv_heads=12, head_dim=64, rope_theta=10000.0, tie_embeddings=True, dtype="bfloat16",
    )
    c.train.update(steps=5000, batch_size=64, learning_rate=6e-4, warmup_steps=200)
    c.data.seq_len = 1024
    return c
