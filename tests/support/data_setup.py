"""A small BPE tokenizer trained on local text, written as a model directory (tokenizer.json and
tokenizer_config.json), so tests of tokenized data need no download."""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Packing puts documents back to back; segment ids keep them apart.",
    "A tokenizer maps text to ids, and ids back to text, with merges learned from data.",
    "Sphinx of black quartz, judge my vow! 0123456789 café naïve façade",
]


def make_tokenizer(directory: Path, *, vocab_size: int = 320, config: dict | None = None,
                   corpus: list[str] | None = None) -> Path:
    """Train a byte-level BPE on `corpus` and write it with a tokenizer_config.json; returns `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus or CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    default = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True,
               "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(default if config is None else config))
    return directory
