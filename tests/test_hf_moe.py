"""Mixtral and Qwen 3 MoE against transformers: logits of the loaded weights (the same routing),
the loss and gradients of a training step, and a lossless import -> export that transformers loads
back. Tiny random models built here with transformers' config classes; nothing is downloaded."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from efficient_train.tools.hf import config_from_hf, export_hf, import_hf, load_llama
from tests.test_hf_families import (
    check_gradient_parity,
    randomized_model,
    relative_error,
    token_ids,
    torch_logits,
    torch_loss_and_grads,
)

torch.set_num_threads(1)

TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "head_dim": 8}
FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, {"num_experts": 6, "num_experts_per_tok": 3,
                                                        "moe_intermediate_size": 16, "norm_topk_prob": False}),
}


def random_model(family: str) -> torch.nn.Module:
    config_cls, model_cls, overrides = FAMILIES[family]
    return randomized_model(config_cls, model_cls, {**TINY, **overrides})


@pytest.fixture(scope="module", params=["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def saved(request, tmp_path_factory):
    model = random_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path, safe_serialization=True)
    return request.param, path, model


def test_logits_match_transformers(saved):
    family, path, model = saved
    ours = load_llama(path)
    assert ours.cfg.num_experts == FAMILIES[family][2].get("num_experts", 4)
    ids = token_ids()
    assert relative_error(np.asarray(ours(jnp.asarray(ids))), torch_logits(model, ids)) < 1e-4


def _reference_grads(model: torch.nn.Module, ids: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and gradients in the on-disk names (transformers fuses each layer's experts in memory:
    gate_up_proj [experts, 2 x inter, hidden] = w1 | w3, down_proj [experts, hidden, inter] = w2)."""
    loss, fused = torch_loss_and_grads(model, ids)
    grads = {}
    for name, g in fused.items():
        if name.endswith("experts.gate_up_proj"):
            prefix, half = name[: -len("gate_up_proj")], g.shape[1] // 2
            for j in range(g.shape[0]):
                grads[f"{prefix}{j}.gate"], grads[f"{prefix}{j}.up"] = g[j, :half], g[j, half:]
        elif name.endswith("experts.down_proj"):
            for j in range(g.shape[0]):
                grads[f"{name[: -len('down_proj')]}{j}.down"] = g[j]
        else:
            grads[name] = g
    return loss, grads


DISK_TO_FUSED = {".w1.weight": ".gate", ".w3.weight": ".up", ".w2.weight": ".down", ".gate_proj.weight": ".gate",
                 ".up_proj.weight": ".up", ".down_proj.weight": ".down"}


def _fused_name(name: str) -> str:
    name = name.replace("block_sparse_moe.", "mlp.")
    if ".experts." in name:
        for disk, fused in DISK_TO_FUSED.items():
            if name.endswith(disk):
                return name[: -len(disk)] + fused
    return name


@pytest.mark.slow
def test_training_gradients_match_transformers(saved):
    family, path, model = saved
    ids = token_ids()
    loss, reference = _reference_grads(model, ids)
    _, compared = check_gradient_parity(path, ids, loss, reference, _fused_name)
    assert compared == len(reference)


def test_import_export_round_trip_loads_in_transformers(saved, tmp_path):
    family, path, model = saved
    step_dir = import_hf(path, str(tmp_path / "ckpt"))
    export_hf(step_dir, str(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    assert type(back) is type(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        original = json.load(f)
    with open(tmp_path / "out" / "config.json", encoding="utf-8") as f:
        exported = json.load(f)
    assert config_from_hf(exported) == config_from_hf(original)
