"""Text in, text out: prompts encoded with a tokenizer (data/tokenizer.py), continued by `generate`.

With no tokenizer (`""`, the byte-level default runs), a prompt's tokens are its UTF-8
bytes. A prompt starts a document (the tokenizer's bos, if it adds one) and is never
closed by an eos; generation stops at the tokenizer's eos where it has one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from efficient_train.data.errors import DataError
from efficient_train.data.tokenizer import Tokenizer, load_tokenizer
from efficient_train.generate.decode import generate
from efficient_train.generate.sampling import DEFAULT_SAMPLING, SamplingOptions

if TYPE_CHECKING:
    from efficient_train.models.llama.model import Llama


def complete(model: Llama, prompts: Sequence[str], *, tokenizer: Tokenizer | str = "", max_new_tokens: int = 64,
             options: SamplingOptions = DEFAULT_SAMPLING, seed: int = 0) -> list[str]:
    """Each prompt's continuation (the generated text only)."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, "--tokenizer")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise DataError(f"--tokenizer: {tokenizer.where} has {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocabulary of {model.cfg.vocab_size}; use the tokenizer the model was trained with")
    ids = [tokenizer.encode_prompt(text).tolist() for text in prompts]
    rows = generate(model, ids, max_new_tokens=max_new_tokens, options=options, seed=seed, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(row) for row in rows]
