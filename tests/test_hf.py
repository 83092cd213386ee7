"""Hugging Face interop against transformers itself: logits of loaded weights, lossless
import/export, bit-exact imported parameters, a trainer resuming from an import, and
one-line refusals of what the model cannot represent."""
from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from efficient_train import cli
from efficient_train.checkpoint import CheckpointError, read_metadata
from efficient_train.checkpoint.storage import read_leaf
from efficient_train.models import ModelConfig
from efficient_train.tools.hf import config_from_hf, config_to_hf, export_hf, import_hf, load_llama

torch.set_num_threads(1)  # the test machine has 2 cores shared with other workers

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 5000.0}
VARIANTS = {
    "gqa_untied": {"tie_word_embeddings": False},
    "gqa_tied_head_dim32": {"tie_word_embeddings": True, "head_dim": 32},  # head_dim != hidden / heads
    "mha_untied": {"tie_word_embeddings": False, "num_key_value_heads": 4},
}


def random_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A transformers Llama with O(1) activations: sharp attention, norm scales far from one."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.copy_(1 + 0.5 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / parameter.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[str, LlamaForCausalLM]]:
    """Each variant saved in fp32 as one model.safetensors, with its torch model."""
    out = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        model = random_llama(seed=i, **overrides)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


def token_ids(batch: int = 2, seq: int = 16) -> np.ndarray:
    return np.random.default_rng(1).integers(0, TINY["vocab_size"], (batch, seq))


def torch_logits(model: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def hf_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    """The model's tensors, read by transformers' own loader."""
    return {name: t.detach() for name, t in LlamaForCausalLM.from_pretrained(hf_dir).state_dict().items()}


def stored_names(hf_dir: str) -> list[str]:
    """The names in the safetensors files, read by the safetensors package."""
    names = []
    for file in glob.glob(os.path.join(hf_dir, "*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names += f.keys()
    return sorted(names)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_dirs, variant):
    path, model = hf_dirs[variant]
    ids = token_ids()
    ours = load_llama(path)
    logits = np.asarray(ours(jnp.asarray(ids)))
    reference = torch_logits(model, ids)
    assert logits.shape == (2, 16, TINY["vocab_size"])
    assert relative_error(logits, reference) < 1e-4
    # The check can see a RoPE mistake: without rotation the logits are far off.
    unrotated = np.asarray(ours(jnp.asarray(ids), positions=jnp.zeros(ids.shape, jnp.int32)))
    assert relative_error(unrotated, reference) > 1e-2


def test_sharded_bf16_directory_loads(tmp_path):
    model = random_llama(seed=7).to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = token_ids()
    logits = np.asarray(load_llama(str(tmp_path), dtype="float32")(jnp.asarray(ids)))
    # The reference runs in fp32 on the same bf16-rounded weights (a fresh load: converting
    # `model` back would keep its RoPE frequencies rounded to bf16).
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert relative_error(logits, torch_logits(reference, ids)) < 1e-4


@pytest.mark.parametrize(
    "variant,scan_layers,source_dtype",
    [("gqa_untied", True, "float32"), ("gqa_tied_head_dim32", False, "float32"), ("gqa_untied", False, "bfloat16")],
)
def test_import_then_export_is_lossless(hf_dirs, tmp_path, variant, scan_layers, source_dtype):
    path = hf_dirs[variant][0]
    if source_dtype == "bfloat16":  # bf16 weights through fp32 master weights and back
        path = str(tmp_path / "bf16")
        LlamaForCausalLM.from_pretrained(hf_dirs[variant][0]).to(torch.bfloat16).save_pretrained(path)
    step_dir = import_hf(path, str(tmp_path / "ckpt"), scan_layers=scan_layers)
    # A small shard limit makes the exporter write several shards and an index.
    files = export_hf(step_dir, str(tmp_path / "out"), dtype=source_dtype, max_shard_bytes=40_000)
    assert len(files) > 1

    assert stored_names(str(tmp_path / "out")) == stored_names(path)
    original, exported = hf_tensors(path), hf_tensors(str(tmp_path / "out"))
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name  # bitwise

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        original_json = json.load(f)
    with open(tmp_path / "out" / "config.json", encoding="utf-8") as f:
        exported_json = json.load(f)
    assert config_from_hf(exported_json) == config_from_hf(original_json)
    before, after = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(tmp_path / "out")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
                  "hidden_act", "dtype"):
        assert getattr(after, field) == getattr(before, field), field


def test_config_round_trip():
    cfg = ModelConfig(vocab_size=1000, hidden_size=96, intermediate_size=200, num_layers=3, num_heads=6,
                      num_kv_heads=3, head_dim=24, rope_theta=500000.0, rms_norm_eps=1e-6, tie_embeddings=True)
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_imported_params_are_the_hf_tensors_bit_exactly(hf_dirs, tmp_path):
    path, model = hf_dirs["gqa_untied"]
    step_dir = import_hf(path, str(tmp_path / "ckpt"))
    metadata = read_metadata(step_dir)
    assert metadata.step == 0 and metadata.optimizer is None

    weights = {name: t.numpy() for name, t in model.state_dict().items()}
    e, h, kv, d = 64, 4, 2, 16

    def stacked(suffix: str, to_ours) -> np.ndarray:
        return np.stack([to_ours(weights[f"model.layers.{i}.{suffix}"]) for i in range(2)])

    # Our kernels are (in..., out...); a torch Linear weight is [out, in], heads flattened head-major.
    expected = {
        "embed/embedding": weights["model.embed_tokens.weight"],
        "final_norm/scale": weights["model.norm.weight"],
        "lm_head/kernel": weights["lm_head.weight"].T,
        "blocks/attn_norm/scale": stacked("input_layernorm.weight", lambda w: w),
        "blocks/mlp_norm/scale": stacked("post_attention_layernorm.weight", lambda w: w),
        "blocks/attn/q/kernel": stacked("self_attn.q_proj.weight", lambda w: w.T.reshape(e, h, d)),
        "blocks/attn/k/kernel": stacked("self_attn.k_proj.weight", lambda w: w.T.reshape(e, kv, d)),
        "blocks/attn/v/kernel": stacked("self_attn.v_proj.weight", lambda w: w.T.reshape(e, kv, d)),
        "blocks/attn/o/kernel": stacked("self_attn.o_proj.weight", lambda w: w.T.reshape(h, d, e)),
        "blocks/mlp/gate/kernel": stacked("mlp.gate_proj.weight", lambda w: w.T),
        "blocks/mlp/up/kernel": stacked("mlp.up_proj.weight", lambda w: w.T),
        "blocks/mlp/down/kernel": stacked("mlp.down_proj.weight", lambda w: w.T),
    }
    assert sorted(name for name in metadata.leaves if name.startswith("params/")) == sorted(
        f"params/{leaf}" for leaf in expected)
    for leaf, value in expected.items():
        np.testing.assert_array_equal(read_leaf(step_dir, f"params/{leaf}"), value, err_msg=leaf)


@pytest.mark.slow
def test_trainer_fine_tunes_from_an_import(hf_dirs, tmp_path, capsys):
    from efficient_train import Trainer, get_config
    from efficient_train.config import apply_overrides

    path, model = hf_dirs["gqa_tied_head_dim32"]
    out = tmp_path / "ckpt"
    assert cli.main(["checkpoint", "import-hf", path, str(out)]) == 0
    printed = capsys.readouterr().out
    flags = printed.split("efficient-train train ")[1].split()
    assert cli.main(["checkpoint", "inspect", str(out)]) == 0
    assert "written without a mesh (imported" in capsys.readouterr().out
    config = get_config()
    apply_overrides(config, dict(flag[len("--config."):].split("=", 1) for flag in flags))
    config.data.update(source="synthetic", seq_len=16)
    config.train.update(batch_size=8, steps=1)
    config.workdir = str(tmp_path / "run")
    trainer = Trainer(config)
    assert config.checkpoint.dir == str(out) and int(trainer.state.step) == 0
    embedding = np.asarray(jax.device_get(trainer.state.params["embed"]["embedding"]))
    np.testing.assert_array_equal(embedding, model.state_dict()["model.embed_tokens.weight"].numpy())
    assert np.isfinite(trainer.fit()["loss"])
    # The trained step (a full checkpoint, optimizer state included) exports too.
    export_hf(str(out), str(tmp_path / "trained"))
    trained = hf_tensors(str(tmp_path / "trained"))["model.layers.1.self_attn.o_proj.weight"].numpy()
    o_kernel = np.asarray(jax.device_get(trainer.state.params["blocks"]["attn"]["o"]["kernel"]))[1]  # (h, d, e)
    np.testing.assert_array_equal(trained, o_kernel.reshape(4 * 32, 64).T)


def _write_config(directory, **changes) -> str:
    os.makedirs(directory, exist_ok=True)
    config = LlamaConfig(**TINY).to_dict()
    config.update(changes)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(directory)


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "mistral", "attention_bias": True}, "attention_bias"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"sliding_window": 4096}, "sliding_window"),  # llama has no window
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True, "sliding_window": 8},
         "use_bidirectional_attention"),
        ({"model_type": "gemma2", "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]},
         "layer_types"),
    ],
)
def test_unsupported_configs_are_one_line_errors(tmp_path, capsys, changes, field):
    hf_dir = _write_config(tmp_path / "hf", **changes)
    assert cli.main(["checkpoint", "import-hf", hf_dir, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: config.json: ") and field in err, err
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with pytest.raises(CheckpointError, match=field):
        config_from_hf(config)
    assert not os.path.exists(tmp_path / "out")


def test_bad_directories_are_one_line_errors(hf_dirs, tmp_path, capsys):
    def error_of(*args: str) -> str:
        assert cli.main(["checkpoint", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "config.json" in error_of("import-hf", str(tmp_path), str(tmp_path / "out"))
    # config.json promises a third layer that the weights lack
    shutil.copytree(hf_dirs["gqa_untied"][0], tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_hidden_layers": 3}))
    assert "model.layers.2." in error_of("import-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert "param_dtype" in error_of("import-hf", hf_dirs["gqa_untied"][0], str(tmp_path / "o"),
                                     "--param_dtype", "float16")
    assert "CKPT" in error_of("export-hf", str(tmp_path / "missing"), str(tmp_path / "exported"))


def test_cli_export_bf16(hf_dirs, tmp_path, capsys):
    path, _ = hf_dirs["mha_untied"]
    step_dir = import_hf(path, str(tmp_path / "ckpt"))
    assert cli.main(["checkpoint", "export-hf", step_dir, str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert "1 safetensors file" in capsys.readouterr().out
    exported = hf_tensors(str(tmp_path / "out"))
    for name, tensor in hf_tensors(path).items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name  # round to nearest even, as torch
    assert AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    # Exporting into a directory that holds files is refused rather than mixing shards.
    assert cli.main(["checkpoint", "export-hf", step_dir, str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
