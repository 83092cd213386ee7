"""The name of a pytree leaf: its key path joined by "/" ("params/blocks/attn/q/kernel").

One rule for every such name: checkpoints store them (leaf names, the tree metadata's
keys, the quantized leaves of the optimizer's description), so they must not change.
A dict key, an attribute or a sequence index each give their plain value ("mu", not
".mu"; "0", not "[0]"). Plain Python and jax only, so checkpoint, optim and the tools
all import it.
"""
from __future__ import annotations

from typing import Any

import jax


def key_name(key: Any) -> str:
    """One key of a jax key path as text: a DictKey's or FlattenedIndexKey's key, a
    GetAttrKey's name, a SequenceKey's index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unsupported pytree key {key!r}")


def key_path_name(path: tuple) -> str:
    """A jax key path (from `jax.tree_util.tree_flatten_with_path`) as "a/b/c"."""
    return "/".join(key_name(key) for key in path)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """("params/blocks/attn/q/kernel", leaf) pairs, a stable name per leaf."""
    return [(key_path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
