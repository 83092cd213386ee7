"""gemma3_4b: the Gemma 3 4B text architecture (3.88B parameters).

34 layers, hidden 2560, 8 query heads and 4 key/value heads of 256, GeGLU 10240, tied
embeddings over 262208 tokens scaled by sqrt(hidden), (1 + w) RMSNorms before and after
attention and the MLP and on every q and k head, scores scaled by 256^-1/2. Five local
layers (a 1024-token window, RoPE theta 10000) per global one (RoPE theta 1e6 with
linear scaling 8). ZeRO-3, full rematerialization.

    efficient-train estimate --config configs/gemma3_4b.py --devices 8 --config.mesh.data=8
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.zero_stage = 3
    c.model.update(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8,
        num_kv_heads=4, head_dim=256, rms_norm_eps=1e-6, tie_embeddings=True, dtype="bfloat16", remat="full",
        rope_theta=1000000.0, rope_type="linear", rope_factor=8.0, local_rope_theta=10000.0,
        sliding_window=1024, global_every=6, qk_norm=True, activation="gelu_tanh", norm_plus_one=True,
        embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=256.0,
    )
    c.train.update(steps=10000, batch_size=64, grad_accum=4, learning_rate=3e-4, warmup_steps=1000)
    c.data.seq_len = 4096
    return c
