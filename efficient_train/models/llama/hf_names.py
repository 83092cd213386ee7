"""The Hugging Face tensor names and shapes of our parameter leaves (Llama, Qwen 2/3, Mistral, Gemma 2/3).

- Names. Each parameter leaf ("blocks/attn/q/kernel") maps to HF tensors
  ("model.layers.{i}.self_attn.q_proj.weight"): one per layer for a stacked leaf
  (scan_layers=True, leading layers axis), one for an unscanned "blocks/{i}/..." leaf or
  a top-level one. The leaves themselves come from the model (tools/safetensors.py's
  `tensor_maps` lists them with `nnx.eval_shape`), so a parameter this table does not
  know is an error there, never a silent skip.
- Shapes. Our kernels are (in..., out...) with heads kept as their own axis (q: (embed,
  heads, head_dim), o: (heads, head_dim, embed)); a torch Linear weight is [out, in] with
  heads flattened head-major. So a kernel maps by a reshape to [in, out] and a
  transpose, nothing else: our RoPE is rotate-half, the convention HF Llama weights
  are stored in, so q and k need no permutation of their rows. Norm scales and the
  embedding table have the same layout on both sides; a q/k/v bias (heads, head_dim)
  is HF's flat [heads * head_dim].
- Families. The five families share these names; only the norms around the MLP
  differ: Llama's `post_attention_layernorm` is the norm *before* the MLP, while Gemma
  2/3 (sandwich norms) call that one `pre_feedforward_layernorm` and use
  `post_attention_layernorm` for the norm after attention.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# Our name inside a decoder block -> (HF name inside "model.layers.{i}.", input dims of
# our kernel, 0 for a bias HF stores flat, or None where both sides share one layout).
LAYER_TENSORS: dict[str, tuple[str, int | None]] = {
    "attn_norm/scale": ("input_layernorm.weight", None),
    "attn/q/kernel": ("self_attn.q_proj.weight", 1),
    "attn/k/kernel": ("self_attn.k_proj.weight", 1),
    "attn/v/kernel": ("self_attn.v_proj.weight", 1),
    "attn/o/kernel": ("self_attn.o_proj.weight", 2),
    "mlp_norm/scale": ("post_attention_layernorm.weight", None),
    "mlp/gate/kernel": ("mlp.gate_proj.weight", 1),
    "mlp/up/kernel": ("mlp.up_proj.weight", 1),
    "mlp/down/kernel": ("mlp.down_proj.weight", 1),
    "attn/q/bias": ("self_attn.q_proj.bias", 0),
    "attn/k/bias": ("self_attn.k_proj.bias", 0),
    "attn/v/bias": ("self_attn.v_proj.bias", 0),
    "attn/o/bias": ("self_attn.o_proj.bias", None),
    "attn/q_norm/scale": ("self_attn.q_norm.weight", None),
    "attn/k_norm/scale": ("self_attn.k_norm.weight", None),
}
# Gemma 2/3's names for the norms around attention and the MLP.
SANDWICH_TENSORS: dict[str, tuple[str, int | None]] = {
    "mlp_norm/scale": ("pre_feedforward_layernorm.weight", None),
    "post_attn_norm/scale": ("post_attention_layernorm.weight", None),
    "post_mlp_norm/scale": ("post_feedforward_layernorm.weight", None),
}
TOP_TENSORS: dict[str, tuple[str, int | None]] = {
    "embed/embedding": ("model.embed_tokens.weight", None),
    "final_norm/scale": ("model.norm.weight", None),
    "lm_head/kernel": ("lm_head.weight", 1),
}
# Present in some HF files but derived, not learned: RoPE's inverse frequencies, and the
# output head of a tied model (transformers ties it to the embedding on load).
DERIVED_SUFFIX = "rotary_emb.inv_freq"
TIED_HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter leaf of ours and the HF tensor(s) it is made of."""

    leaf: str  # name under "params/", e.g. "blocks/attn/q/kernel"
    hf_names: tuple[str, ...]  # one per layer when stacked, else exactly one
    stacked: bool  # the leaf has a leading layers axis
    shape: tuple[int, ...]  # our shape of one HF tensor's worth (one layer when stacked)
    n_in: int | None  # a kernel (in..., out...) with n_in input dims; None: same layout

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        return (len(self.hf_names), *self.shape) if self.stacked else self.shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return self.shape
        if self.n_in == 0:
            return (math.prod(self.shape),)
        return (math.prod(self.shape[self.n_in:]), math.prod(self.shape[: self.n_in]))

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """Our array of `shape` -> the HF tensor (a torch Linear weight is [out, in])."""
        if self.n_in is None:
            return value
        if self.n_in == 0:
            return value.reshape(self.hf_shape)
        return value.reshape(self.hf_shape[::-1]).T

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        """The HF tensor -> our array of `shape`."""
        if self.n_in is None:
            return tensor
        if self.n_in == 0:
            return tensor.reshape(self.shape)
        return tensor.T.reshape(self.shape)


def map_leaf(leaf: str, shape: tuple[int, ...], num_layers: int, sandwich_norms: bool = False) -> TensorMap | None:
    """The HF tensors of our leaf of `shape` in a model of `num_layers` (with Gemma's
    norm names when `sandwich_norms`); None: it has none."""
    if leaf in TOP_TENSORS:
        name, n_in = TOP_TENSORS[leaf]
        return TensorMap(leaf, (name,), False, shape, n_in)
    table = {**LAYER_TENSORS, **SANDWICH_TENSORS} if sandwich_norms else LAYER_TENSORS
    head, _, rest = leaf.partition("/")
    index, _, inner = rest.partition("/")
    if head == "blocks" and index.isdigit() and inner in table:  # scan_layers=False
        name, n_in = table[inner]
        return TensorMap(leaf, (f"model.layers.{index}.{name}",), False, shape, n_in)
    if head == "blocks" and rest in table:  # scan_layers=True: [layers, ...]
        name, n_in = table[rest]
        names = tuple(f"model.layers.{i}.{name}" for i in range(num_layers))
        return TensorMap(leaf, names, True, shape[1:], n_in)
    return None

