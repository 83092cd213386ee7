"""LoRA on a tiny imported Llama: the README's "Fine-tune an imported model with LoRA" and the tests.

The model fields are those of the tiny transformers Llama the README builds (byte-level
vocabulary, so the default text data trains it); `finetune.base` is where its
`checkpoint import-hf` put it. Adapters of rank 8 on every projection.
"""
from efficient_train.config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/lora_tiny"
    c.model.update(dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False))
    c.finetune.base = "runs/tiny_llama_base"
    c.finetune.lora.update(dict(rank=8, alpha=16.0, dropout=0.05, targets="q,k,v,o,gate,up,down"))
    c.train.update(dict(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=4, log_every=10))
    c.optimizer.weight_decay = 0.0
    c.data.seq_len = 64
    c.checkpoint.every = 20
    return c
