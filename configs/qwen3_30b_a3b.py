"""qwen3_30b_a3b: the Qwen3-30B-A3B architecture (30.5B parameters, 3.3B active per token).

48 layers, hidden 2048, 32 query heads and 4 key/value heads of 128 with q/k RMSNorms,
every layer a Mixture of Experts: 128 SwiGLU experts of 768, 8 per token (softmax, top
8, renormalized: norm_topk_prob), untied embeddings over a 151936-entry vocabulary, RoPE
theta 1e6. Experts split over `mesh.expert` (8: 16 experts per device); ZeRO-3 over the
rest. `import-hf` of Qwen/Qwen3-30B-A3B prints these model fields.

    efficient-train estimate --config configs/qwen3_30b_a3b.py --config.mesh.expert=8 --config.mesh.data=1
    efficient-train estimate --config configs/qwen3_30b_a3b.py --config.mesh.expert=8 --config.mesh.data=8
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.zero_stage = 3
    c.mesh.update(data=-1, expert=8)
    c.model.update(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_embeddings=False, qk_norm=True,
        dtype="bfloat16", remat="full", num_experts=128, experts_per_token=8, moe_intermediate_size=768,
        norm_topk_prob=True,
    )
    c.train.update(steps=10000, batch_size=64, grad_accum=4, learning_rate=3e-4, warmup_steps=1000)
    c.data.seq_len = 4096
    return c
