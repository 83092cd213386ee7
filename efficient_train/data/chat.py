"""Chat records -> token ids and a loss mask that is 1 on assistant tokens only.

A record's `messages` ([{"role", "content"}, ...]) is rendered with the tokenizer's own
chat template in a sandboxed jinja2 environment (templates are data from a model
directory, never trusted code), set up as transformers does (trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, a `tojson` that keeps non-ASCII text). No
`strftime_now` is given, so templates that print today's date fall back to their fixed
one and a prepared dataset does not depend on the day it was made.

Which characters an assistant wrote is found by rendering prefixes of the conversation:
message k spans from the end of the render of messages[:k] with the generation prompt
to the end of the render of messages[:k+1]; that span (the content and the turn's end
marker, e.g. `<|im_end|>`) is the assistant's. A template whose render of a prefix is
not a prefix of the whole render (one that rewrites earlier turns) is refused by name,
since its assistant tokens cannot be located. The whole render is tokenized once
without added special tokens (the template writes its own), and a token counts as the
assistant's when it starts inside an assistant span.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np

from efficient_train.data.errors import DataError
from efficient_train.data.tokenizer import Tokenizer


class TemplateError(Exception):
    """A template's own `raise_exception(...)`, or a render that failed."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=4)
def _compile(template: str) -> Any:
    import jinja2.ext
    import jinja2.sandbox

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise DataError(f"tokenizer: chat_template does not parse (line {error.lineno}: {error.message})") from None


def check_messages(record: Any, field: str) -> list[dict[str, str]]:
    """The conversation of one record, or DataError saying what is wrong with it (no position)."""
    if not isinstance(record, dict):
        raise DataError(f"a JSON {type(record).__name__}, not an object with field '{field}'")
    if field not in record:
        raise DataError(f"field '{field}' missing; each line must be an object with it")
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field '{field}' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(messages):
        ok = (isinstance(message, dict) and isinstance(message.get("role"), str)
              and isinstance(message.get("content"), str))
        if not ok:
            raise DataError(f"{field}[{i}] must be an object with string 'role' and 'content'")
    return messages


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, uint8 mask: 1 on assistant tokens) of one conversation."""
    if tokenizer.chat_template is None:
        raise DataError(f"tokenizer: {tokenizer.where} has no chat_template (tokenizer_config.json "
                        "'chat_template' or chat_template.jinja); --format chat needs one")
    template = _compile(tokenizer.chat_template)
    specials = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}

    def render(prefix: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return template.render(messages=prefix, add_generation_prompt=generation_prompt, **specials)
        except TemplateError as error:
            raise DataError(f"the chat template refused the conversation: {error}") from None
        except Exception as error:  # noqa: BLE001 - a template is data and may fail in any way
            raise DataError(f"the chat template failed: {type(error).__name__}: {error}") from None

    text = render(messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(f"the chat template renders messages[:{k + 1}] differently once later messages "
                            "follow, so the assistant's tokens cannot be located; use a template that "
                            "renders each turn the same way")
        spans.append((len(before), len(through)))
    encoded = tokenizer.encode_chat(text)
    starts = encoded.offsets[:, 0]
    mask = np.zeros(len(encoded.ids), dtype=np.uint8)
    for first, last in spans:
        mask[(starts >= first) & (starts < last)] = 1
    return encoded.ids, mask
