"""Every supported Hugging Face family against transformers itself: Llama 3.x RoPE scalings,
Qwen 2 (q/k/v biases), Qwen 3 (q/k norms), Mistral (sliding window), Gemma 2 and Gemma 3
(GeGLU, (1 + w) norms, scaled embeddings, sandwich norms, soft-capping, local and global
layers). For each: logits of the loaded weights, gradients of a training step, and a
lossless import -> export that transformers loads back. Tiny random models are built
here with transformers' config classes; nothing is downloaded. Sequences are longer
than every sliding window, so the window matters."""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from efficient_train.models import Llama
from efficient_train.tools.hf import config_from_hf, export_hf, import_hf, load_llama
from efficient_train.tools.safetensors import tensor_maps

torch.set_num_threads(1)  # the test machine has 2 cores shared with other workers

SEQ = 16
TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "head_dim": 8}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
FAMILIES = {
    "llama3": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE}),
    "llama_linear": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4,
                                                                         "factor": 4.0}}),
    # dynamic NTK: the 16-token rows pass the 8-position context, so the base grows
    "llama_dynamic": (LlamaConfig, LlamaForCausalLM, {"max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}),
    "llama_yarn": (LlamaConfig, LlamaForCausalLM, {"max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"rope_theta": 1e6}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 5}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 5, "query_pre_attn_scalar": 12,
                                                 "attn_logit_softcapping": 3.0, "final_logit_softcapping": 4.0}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {
        "sliding_window": 5, "sliding_window_pattern": 2, "query_pre_attn_scalar": 12,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
}
FAST = "gemma3"  # the one family in the fast tier: it has the most features


def family_param(name: str):
    return pytest.param(name, marks=() if name == FAST else pytest.mark.slow)


def randomized_model(config_cls: type, model_cls: type, fields: dict, seed: int = 0,
                     zero_centred_norms: bool = False) -> torch.nn.Module:
    """A tiny transformers model (eager attention) with O(1) activations: sharp attention, norms far
    from identity; `zero_centred_norms` for families whose norms scale by 1 + w (Gemma)."""
    torch.manual_seed(seed)
    config = config_cls(**fields)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                centre = 0.0 if zero_centred_norms and "norm" in name else 1.0
                parameter.copy_(centre + 0.5 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / parameter.shape[-1] ** 0.5)
    return model


def random_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model with O(1) activations."""
    config_cls, model_cls, overrides = FAMILIES[family]
    return randomized_model(config_cls, model_cls, {**TINY, **overrides}, seed,
                            zero_centred_norms=family.startswith("gemma"))


def token_ids(batch: int = 2, seq: int = SEQ) -> np.ndarray:
    return np.random.default_rng(1).integers(0, TINY["vocab_size"], (batch, seq))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()

def torch_loss_and_grads(model: torch.nn.Module, ids: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' mean next-token loss on `ids` and its gradient per parameter name."""
    model.zero_grad()
    logits = model(torch.tensor(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.tensor(ids[:, 1:]).reshape(-1))
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def check_gradient_parity(path: str, ids: np.ndarray, loss: float, reference: dict[str, np.ndarray],
                          reference_name: Callable[[str], str] = lambda name: name) -> tuple[Llama, int]:
    """Our model loaded from `path`: its loss within 1e-4 of `loss` and every gradient, in HF tensor
    names (`reference_name` maps one to `reference`'s key), within 1e-4; returns the model and the
    number of tensors compared."""
    ours = load_llama(path)
    graphdef, params = nnx.split(ours, nnx.Param)

    def our_loss(params):
        out = nnx.merge(graphdef, params)(jnp.asarray(ids))
        return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], jnp.asarray(ids[:, 1:])).mean()

    our_value, grads = jax.value_and_grad(our_loss)(params)
    assert abs(float(our_value) - loss) < 1e-4 * abs(loss)
    flat = {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    compared = 0
    for m in tensor_maps(ours.cfg):
        for name, part in zip(m.hf_names, m.parts(flat[m.leaf])):
            assert relative_error(m.to_hf(part), reference[reference_name(name)]) < 1e-4, name
            compared += 1
    return ours, compared



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (fp32 directory, torch model), built on first use."""
    cache: dict[str, tuple[str, torch.nn.Module]] = {}

    def get(family: str) -> tuple[str, torch.nn.Module]:
        if family not in cache:
            model = random_model(family)
            path = str(tmp_path_factory.mktemp(family))
            model.save_pretrained(path, safe_serialization=True)
            cache[family] = (path, model)
        return cache[family]

    return get


@pytest.mark.parametrize("family", [family_param(name) for name in FAMILIES])
def test_logits_match_transformers(saved, family):
    path, model = saved(family)
    ids = token_ids()
    ours = load_llama(path)
    assert relative_error(np.asarray(ours(jnp.asarray(ids))), torch_logits(model, ids)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_gradients_match_transformers(saved, family):
    """The gradient of the mean next-token loss, tensor by tensor, in HF names."""
    path, model = saved(family)
    ids = token_ids()
    loss, reference = torch_loss_and_grads(model, ids)
    ours, compared = check_gradient_parity(path, ids, loss, reference)
    assert compared == len([n for n in reference if n != "lm_head.weight" or not ours.cfg.tie_embeddings])


@pytest.mark.parametrize("family", [family_param(name) for name in FAMILIES])
def test_import_export_round_trip_loads_in_transformers(saved, tmp_path, family):
    path, model = saved(family)
    step_dir = import_hf(path, str(tmp_path / "ckpt"))
    export_hf(step_dir, str(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    assert type(back) is type(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    ids = token_ids()
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(model, ids))
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        original = json.load(f)
    with open(tmp_path / "out" / "config.json", encoding="utf-8") as f:
        exported = json.load(f)
    assert config_from_hf(exported) == config_from_hf(original)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_bf16_directory_loads(tmp_path, family):
    model = random_model(family, seed=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = token_ids()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    logits = np.asarray(load_llama(str(tmp_path), dtype="float32")(jnp.asarray(ids)))
    assert relative_error(logits, torch_logits(reference.eval(), ids)) < 1e-4
    bf16 = np.asarray(load_llama(str(tmp_path), dtype="bfloat16")(jnp.asarray(ids)))
    assert relative_error(bf16, torch_logits(reference, ids)) < 5e-2


def test_tokenizer_and_generation_files_travel(saved, tmp_path, capsys):
    """import-hf keeps the tokenizer beside the steps (a directory data.tokenizer takes);
    export-hf puts it into the exported model, which transformers then loads whole."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    from efficient_train import cli
    from efficient_train.data.tokenizer import load_tokenizer
    from tests.support.data_setup import make_tokenizer

    source = tmp_path / "hf"
    shutil.copytree(saved(FAST)[0], source)
    make_tokenizer(source, vocab_size=TINY["vocab_size"], config={
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    GenerationConfig(max_new_tokens=7, eos_token_id=1).save_pretrained(source)
    assert cli.main(["checkpoint", "import-hf", str(source), str(tmp_path / "ckpt")]) == 0
    assert f"--config.data.tokenizer={tmp_path / 'ckpt' / 'tokenizer'}" in capsys.readouterr().out
    assert len(load_tokenizer(str(tmp_path / "ckpt" / "tokenizer")).encode_documents(["the quick fox"])[0]) > 2
    assert cli.main(["checkpoint", "export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes(), name
    text = "The quick brown fox"
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(text).input_ids == \
        AutoTokenizer.from_pretrained(source)(text).input_ids
    assert GenerationConfig.from_pretrained(tmp_path / "out").max_new_tokens == 7
