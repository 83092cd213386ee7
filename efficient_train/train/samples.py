"""A hook that prints what the model writes: prompts continued every N steps during training.

`sample_hook(every, prompts, ...)` returns a `Hook` (the config's `sample.*` fields build
one; a script can pass its own to `Trainer(hooks=...)`). Every process runs the decoding,
which is a program on the whole mesh with the training parameters where they are
(generate/decode.py); process 0 prints, above the progress bar.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from tqdm import tqdm

from efficient_train.data.tokenizer import load_tokenizer
from efficient_train.generate import SamplingOptions, complete
from efficient_train.train.trainer import Hook

if TYPE_CHECKING:
    from efficient_train.models.llama.model import Llama


def sample_hook(every: int, prompts: Sequence[str], *, tokenizer: str = "", max_new_tokens: int = 64,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Hook:
    """Print each prompt's continuation by the current parameters every `every` steps."""
    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p)
    options.check()
    loaded = load_tokenizer(tokenizer, "data.tokenizer")

    def show(trainer: Any, step: int, record: dict) -> None:
        model = cast("Llama", trainer.setup.step_def.module(trainer.state.params, trainer.state.frozen))
        texts = complete(model, prompts, tokenizer=loaded, max_new_tokens=max_new_tokens, options=options,
                         seed=seed + step)
        if trainer.is_main:
            for prompt, text in zip(prompts, texts):
                tqdm.write(f"sample step {step}: {prompt!r} -> {text!r}")

    return Hook(every=every, fn=show)
