"""Tokenizers: a HuggingFace `tokenizer.json` (through `tokenizers`), or UTF-8 bytes.

`load_tokenizer(path)` takes a `tokenizer.json` file or a model directory (the one
`checkpoint import-hf` reads), with its `tokenizer_config.json` beside it when there is
one; `load_tokenizer("")` is the byte-level tokenizer (vocab 256), the default of every
source. Nothing is downloaded.

Special tokens follow the tokenizer's own configuration, as transformers applies it:
- when `tokenizer_config.json` sets `add_bos_token` or `add_eos_token` (Llama-style
  configs do), text is encoded without the post-processor and exactly those tokens
  are added around each document (a fast tokenizer's post-processor is rebuilt from
  these flags in transformers too);
- otherwise `tokenizer.json`'s post-processor decides (GPT-2 adds nothing; Llama 3's
  template adds `<|begin_of_text|>`).
`bos_token`, `eos_token` (strings or `{"content": ...}` records) and `chat_template`
(a string, a list of named templates whose `default` is taken, or a
`chat_template.jinja` file in the directory) come from the same files. Chat text is
encoded without added specials: the template writes them itself.

`fingerprint` hashes `tokenizer.json` and the rule above, so a prepared dataset knows
whether it was made by this tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from efficient_train.data.errors import DataError, read_regular, stat_path

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class Encoded:
    """One text's token ids and each token's [start, end) character span."""

    ids: np.ndarray
    offsets: np.ndarray


class Tokenizer:
    """The byte-level tokenizer: a document's UTF-8 bytes are its tokens (vocab 256)."""

    vocab_size = 256
    bos_id: int | None = None
    eos_id: int | None = None
    bos_token = ""
    eos_token = ""
    chat_template: str | None = None
    fingerprint = "bytes-v1"
    where = "byte-level (no tokenizer)"

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Each text as one document's ids, with the configured bos/eos around it."""
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def encode_chat(self, text: str) -> Encoded:
        raise DataError("--format chat needs a tokenizer with a chat template; the byte-level default has none")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from tokenizer.json, with tokenizer_config.json's rules."""

    def __init__(self, path: str | os.PathLike, what: str = "tokenizer") -> None:
        import tokenizers  # a core dependency, loaded only when a tokenizer is used

        path = Path(path)
        directory = path if stat.S_ISDIR(stat_path(path, what).st_mode) else path.parent
        file = path / TOKENIZER_FILE if path == directory else path
        if not file.exists():
            raise DataError(f"{what}: '{directory}' has no {TOKENIZER_FILE}; give a tokenizer.json file or a model "
                            "directory that holds one")
        raw = read_regular(file, what)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as error:  # noqa: BLE001 - the library raises plain Exception for a bad file
            raise DataError(f"{what}: '{file}' is not a tokenizer.json the tokenizers library reads: "
                            f"{' '.join(str(error).split())[:200]}") from None
        config = _read_config(directory / CONFIG_FILE, what)
        self.where = str(file)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_text(config.get("bos_token"), "bos_token", directory)
        self.eos_token = _token_text(config.get("eos_token"), "eos_token", directory)
        self.bos_id = self._token_id(self.bos_token, "bos_token", directory)
        self.eos_id = self._token_id(self.eos_token, "eos_token", directory)
        # None: the post-processor decides; a pair of flags: tokenizer_config.json does.
        flags = [config.get(key) for key in ("add_bos_token", "add_eos_token")]
        self._add: tuple[bool, bool] | None = None
        if any(flag is not None for flag in flags):
            self._add = (bool(flags[0]), bool(flags[1]))
            for flag, token, name in zip(self._add, (self.bos_id, self.eos_id), ("bos", "eos")):
                if flag and token is None:
                    raise DataError(f"{what}: {directory / CONFIG_FILE} sets add_{name}_token but names no "
                                    f"{name}_token in the vocabulary")
        self.chat_template = _chat_template(config, directory, what)
        rule = json.dumps([self._add, self.bos_id, self.eos_id, self.chat_template])
        self.fingerprint = f"hf-v1:{hashlib.sha256(raw + rule.encode()).hexdigest()[:24]}"

    def _token_id(self, text: str, key: str, directory: Path) -> int | None:
        if not text:
            return None
        token = self._tokenizer.token_to_id(text)
        if token is None:
            raise DataError(f"tokenizer: {directory / CONFIG_FILE} {key} {text!r} is not in the tokenizer's vocabulary")
        return token

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=self._add is None)
        if self._add is None:  # the tokenizer's post-processor adds what its config says
            return [np.array(e.ids, dtype=np.int64) for e in encodings]
        add_bos, add_eos = self._add
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        return [np.array(head + e.ids + tail, dtype=np.int64) for e in encodings]

    def encode_chat(self, text: str) -> Encoded:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return Encoded(np.array(encoding.ids, dtype=np.int64), np.array(encoding.offsets, dtype=np.int64))


def load_tokenizer(path: str | os.PathLike, what: str = "tokenizer") -> Tokenizer:
    """The tokenizer at `path` (a tokenizer.json or a directory holding one); "" is byte-level."""
    return Tokenizer() if os.fspath(path) == "" else HFTokenizer(path, what)


def _read_config(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        config = json.loads(read_regular(path, what))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{what}: '{path}' is not JSON: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(config, dict):
        raise DataError(f"{what}: '{path}' holds a JSON {type(config).__name__}, not an object")
    for key in ("add_bos_token", "add_eos_token"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise DataError(f"{what}: '{path}' {key} is {config[key]!r}; allowed true, false or null")
    return config


def _token_text(value: Any, key: str, directory: Path) -> str:
    """A special token's text from tokenizer_config.json: a string or an AddedToken record."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"tokenizer: {directory / CONFIG_FILE} {key} is {value!r}; allowed a string or "
                        "{\"content\": string}")
    return value


def _chat_template(config: dict[str, Any], directory: Path, what: str) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (directory / TEMPLATE_FILE).exists():
        try:
            template = read_regular(directory / TEMPLATE_FILE, what).decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{what}: '{directory / TEMPLATE_FILE}' is not UTF-8") from None
    if template is not None and not isinstance(template, str):
        raise DataError(f"{what}: {directory / CONFIG_FILE} chat_template is a {type(template).__name__}; "
                        "allowed a string or a list of {\"name\", \"template\"} with a 'default'")
    return template
