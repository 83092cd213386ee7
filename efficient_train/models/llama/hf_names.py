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
- Experts (Mixtral, Qwen 3 MoE). The router ('embed', 'router') is HF's `gate` [experts,
  embed]; our stacked expert kernels [experts, in, out] are one torch Linear per expert
  on disk (`experts.{j}.w1` / `gate_proj`, ...), so an expert leaf maps to layers x
  experts tensors, enumerated row-major (`lead`), each a plain kernel.
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
# The MoE layer's leaves, by family ({j}: the expert); routers and experts are plain kernels.
MOE_TENSORS: dict[str, dict[str, str]] = {
    "mixtral": {"mlp/router": "block_sparse_moe.gate.weight", "mlp/experts/gate": "block_sparse_moe.experts.{j}.w1.weight",
                "mlp/experts/up": "block_sparse_moe.experts.{j}.w3.weight",
                "mlp/experts/down": "block_sparse_moe.experts.{j}.w2.weight"},
    "qwen3_moe": {"mlp/router": "mlp.gate.weight", "mlp/experts/gate": "mlp.experts.{j}.gate_proj.weight",
                  "mlp/experts/up": "mlp.experts.{j}.up_proj.weight",
                  "mlp/experts/down": "mlp.experts.{j}.down_proj.weight"},
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
    lead: tuple[int, ...] = ()  # when stacked, the leading dims hf_names enumerate (default: one per name)

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        return (*(self.lead or (len(self.hf_names),)), *self.shape) if self.stacked else self.shape

    def parts(self, value: np.ndarray) -> list[np.ndarray]:
        """Our leaf's value cut into one array of `shape` per HF tensor, in hf_names' order."""
        return list(value.reshape(-1, *self.shape)) if self.stacked else [value]

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


def moe_family(qk_norm: bool) -> str:
    """The HF family whose names an MoE model's tensors take: Qwen 3 MoE (q/k norms) or Mixtral."""
    return "qwen3_moe" if qk_norm else "mixtral"


def _map_expert_leaf(leaf: str, shape: tuple[int, ...], num_layers: int, family: str) -> TensorMap | None:
    """An MoE leaf (router or stacked experts), scanned ("blocks/mlp/...") or not ("blocks/{i}/mlp/...")."""
    head, _, rest = leaf.partition("/")
    index, _, inner = rest.partition("/")
    scanned = not index.isdigit()
    inner = rest if scanned else inner
    table = MOE_TENSORS[family]
    if head != "blocks" or inner not in table:
        return None
    layers = range(num_layers) if scanned else [int(index)]
    one = shape[1:] if scanned else shape
    if inner == "mlp/router":
        names = tuple(f"model.layers.{i}.{table[inner]}" for i in layers)
        return TensorMap(leaf, names, scanned, one, 1)
    experts = one[0]
    names = tuple(f"model.layers.{i}.{table[inner].format(j=j)}" for i in layers for j in range(experts))
    return TensorMap(leaf, names, True, one[1:], 1, lead=shape[:2] if scanned else shape[:1])


def map_leaf(leaf: str, shape: tuple[int, ...], num_layers: int, sandwich_norms: bool = False,
             moe: str | None = None) -> TensorMap | None:
    """The HF tensors of our leaf of `shape` in a model of `num_layers` (with Gemma's
    norm names when `sandwich_norms`, an MoE family's expert names when `moe`); None: it has none."""
    if leaf in TOP_TENSORS:
        name, n_in = TOP_TENSORS[leaf]
        return TensorMap(leaf, (name,), False, shape, n_in)
    if moe is not None and "/mlp/" in f"/{leaf}" and (found := _map_expert_leaf(leaf, shape, num_layers, moe)):
        return found
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

