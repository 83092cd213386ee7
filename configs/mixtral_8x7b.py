"""mixtral_8x7b: the Mixtral 8x7B architecture (46.7B parameters, 12.9B active per token).

32 layers, hidden 4096, 32 query heads and 8 key/value heads of 128, every layer a
Mixture of Experts: 8 SwiGLU experts of 14336, 2 per token (softmax, top 2,
renormalized), untied embeddings over a 32000-entry vocabulary, RoPE theta 1e6.
Experts split over `mesh.expert` (8: one expert per device); ZeRO-3 over the rest.
`import-hf` of mistralai/Mixtral-8x7B-v0.1 prints these model fields.

    efficient-train estimate --config configs/mixtral_8x7b.py --config.mesh.expert=8 --config.mesh.data=1
    efficient-train estimate --config configs/mixtral_8x7b.py --config.mesh.expert=8 --config.mesh.data=8
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.zero_stage = 3
    c.mesh.update(data=-1, expert=8)
    c.model.update(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, tie_embeddings=False, dtype="bfloat16", remat="full",
        num_experts=8, experts_per_token=2, norm_topk_prob=True,
    )
    c.train.update(steps=10000, batch_size=64, grad_accum=4, learning_rate=3e-4, warmup_steps=1000)
    c.data.seq_len = 4096
    return c
