"""A LoRA run's checkpoints, end to end, as the README's workflow runs it: a tiny transformers
Llama imported with `checkpoint import-hf` is the base; `configs/lora_tiny.py` trains adapters on
it, saves, resumes and saves again; a resume on another base is refused; `merge-lora` writes a
full checkpoint that trains as one; `export-hf` writes the merged model, which transformers loads
with our adapter forward's logits, and `--adapters_only` the PEFT layout, which `peft` loads onto
the transformers base with the same logits."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from efficient_train import cli
from efficient_train.checkpoint.metadata import CheckpointError
from efficient_train.checkpoint.verify import read_step_metadata
from efficient_train.config import get_config
from efficient_train.tools.safetensors import SafetensorsDir
from efficient_train.train import Trainer
from efficient_train.train.finetune import base_fingerprint
from efficient_train.tree_paths import leaf_paths

pytestmark = pytest.mark.slow  # three trainers and two transformers models: about a minute on 2 cores
torch.set_num_threads(1)

HF_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
IDS = np.random.default_rng(5).integers(0, 256, (2, 16))


def hf_llama(seed: int) -> LlamaForCausalLM:
    """The tiny Llama of configs/lora_tiny.py with O(1) random weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**HF_TINY)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / parameter.shape[-1] ** 0.5)
    return model


def torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def import_base(tmp, seed: int) -> tuple[str, LlamaForCausalLM]:
    model = hf_llama(seed)
    hf_dir, ckpt = str(tmp / f"hf{seed}"), str(tmp / f"base{seed}")
    model.save_pretrained(hf_dir, safe_serialization=True)
    assert cli.main(["checkpoint", "import-hf", hf_dir, ckpt]) == 0
    return ckpt, model


def run_config(tmp, base: str, steps: int):
    config = get_config("configs/lora_tiny.py")
    config.finetune.base = base
    config.finetune.lora.targets = "q,k,v,o,gate,up,down,embed"
    config.workdir = str(tmp / "lora_run")
    config.data.update(dict(source="synthetic", seq_len=16))
    config.train.update(dict(steps=steps, batch_size=8, log_every=1))
    config.tracker.tensorboard = False
    return config


def adapter_logits(trainer: Trainer) -> np.ndarray:
    model = trainer.setup.step_def.module(trainer.state.params, trainer.state.frozen)
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, IDS))


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base, hf_model = import_base(tmp, seed=0)
    first = Trainer(run_config(tmp, base, steps=3))
    first.fit()
    first.close()
    saved = read_step_metadata(os.path.join(first.checkpointer.directory, "3"))
    resumed = Trainer(run_config(tmp, base, steps=5))  # restore, continue, save again
    start = int(resumed.state.step)
    adapters_at_3 = jax.tree.map(np.asarray, resumed.state.params)
    resumed.fit()
    resumed.close()
    return dict(tmp=tmp, base=base, hf_model=hf_model, saved=saved, resumed=resumed, start=start,
                adapters_at_3=adapters_at_3, ckpt=resumed.checkpointer.directory)


def test_checkpoint_holds_adapters_optimizer_and_the_base_reference(workflow):
    saved = workflow["saved"]
    params = [name for name in saved.leaves if name.startswith("params/")]
    assert params and all("/lora/" in name for name in params)  # no base weight is saved again
    moments = [name for name in saved.leaves if name.startswith("opt_state/") and saved.leaves[name].shape]
    assert moments and all("/lora/" in name for name in moments)
    base_metadata = read_step_metadata(os.path.join(workflow["base"], "0"))
    reference = saved.finetune["base"]
    assert reference == {"path": os.path.join(workflow["base"], "0"), "step": 0,
                         "fingerprint": base_fingerprint(base_metadata)}
    assert saved.finetune["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.05,
                                      "targets": ["q", "k", "v", "o", "gate", "up", "down", "embed"]}


def test_resume_continues_and_saves_again(workflow):
    resumed = workflow["resumed"]
    assert workflow["start"] == 3 and int(resumed.state.step) == 5
    assert os.path.isdir(os.path.join(workflow["ckpt"], "5"))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), workflow["adapters_at_3"], resumed.state.params)
    assert all(jax.tree.leaves(moved))  # every adapter trained on after the restore
    embedding = workflow["hf_model"].state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(resumed.state.frozen["embed"]["embedding"]), embedding)  # base frozen


def test_resume_on_another_base_is_refused(workflow, capsys):
    other, _ = import_base(workflow["tmp"], seed=1)
    with pytest.raises(CheckpointError, match=r"^finetune\.base: .* is not the base step 5 was trained on"):
        Trainer(run_config(workflow["tmp"], other, steps=6))
    other_rank = run_config(workflow["tmp"], workflow["base"], steps=6)
    other_rank.finetune.lora.rank = 4
    with pytest.raises(CheckpointError, match=r"^finetune\.lora: step 5 holds adapters of other settings \(rank: "
                                              r"saved 8, this run 4\)"):
        Trainer(other_rank)
    capsys.readouterr()
    code = cli.main(["train", "--config", "configs/lora_tiny.py", f"--config.finetune.base={other}",
                     "--config.finetune.lora.targets=q,k,v,o,gate,up,down,embed", "--config.data.source=synthetic",
                     "--config.data.seq_len=16", "--config.train.batch_size=8", "--config.train.steps=6",
                     f"--workdir={workflow['tmp'] / 'lora_run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: finetune.base:"), err


def test_merged_checkpoint_exports_to_transformers_with_the_adapter_logits(workflow, capsys):
    tmp, ckpt = workflow["tmp"], workflow["ckpt"]
    expected = adapter_logits(workflow["resumed"])
    assert np.abs(expected - torch_logits(workflow["hf_model"])).max() > 1e-2  # the adapters changed the model
    assert cli.main(["checkpoint", "merge-lora", ckpt, str(tmp / "merged")]) == 0
    merged = read_step_metadata(str(tmp / "merged" / "5"))
    assert merged.optimizer is None and merged.finetune is None and all("/lora/" not in n for n in merged.leaves)
    for source, out in ((ckpt, "hf_from_lora"), (str(tmp / "merged"), "hf_from_merged")):
        assert cli.main(["checkpoint", "export-hf", source, str(tmp / out)]) == 0
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp / out), torch_dtype=torch.float32).eval()
        np.testing.assert_allclose(torch_logits(loaded), expected, atol=1e-4, rtol=1e-4)
    exported = SafetensorsDir(str(tmp / "hf_from_lora"))
    again = SafetensorsDir(str(tmp / "hf_from_merged"))
    name = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(exported.read(name), again.read(name))


def test_merged_checkpoint_trains_as_a_full_checkpoint(workflow):
    tmp = workflow["tmp"]
    if not os.path.isdir(tmp / "merged"):
        assert cli.main(["checkpoint", "merge-lora", workflow["ckpt"], str(tmp / "merged")]) == 0
    config = run_config(tmp, "", steps=6)
    config.finetune.lora.rank = 0
    config.workdir, config.checkpoint.dir = str(tmp / "full_run"), str(tmp / "merged")
    trainer = Trainer(config)  # a params-only checkpoint: a fresh optimizer over every parameter
    assert int(trainer.state.step) == 5 and trainer.state.frozen is None
    assert trainer.setup.num_trainable_params == trainer.setup.num_params
    assert np.isfinite(trainer.fit()["loss"])
    trainer.close()


def test_peft_loads_the_adapters_onto_the_transformers_base(workflow):
    tmp = workflow["tmp"]
    assert cli.main(["checkpoint", "export-hf", workflow["ckpt"], str(tmp / "peft"), "--adapters_only"]) == 0
    with open(tmp / "peft" / "adapter_config.json") as f:
        adapter_config = json.load(f)
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16.0
    model = PeftModel.from_pretrained(hf_llama(seed=0), str(tmp / "peft")).eval()
    np.testing.assert_allclose(torch_logits(model), adapter_logits(workflow["resumed"]), atol=1e-4, rtol=1e-4)
    state = {key for key in model.state_dict() if "lora" in key}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in state


def test_adapter_layout_names_every_layer_and_target(workflow):
    """The PEFT file's keys, shapes and dtype, against PEFT's documented names."""
    from safetensors.numpy import load_file

    tmp = workflow["tmp"]
    if not os.path.isdir(tmp / "peft"):
        assert cli.main(["checkpoint", "export-hf", workflow["ckpt"], str(tmp / "peft"), "--adapters_only"]) == 0
    tensors = load_file(str(tmp / "peft" / "adapter_model.safetensors"))
    modules = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
               "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
               "mlp.down_proj": (128, 64)}
    expected = {"base_model.model.model.embed_tokens.lora_embedding_A": (8, 256),
                "base_model.model.model.embed_tokens.lora_embedding_B": (64, 8)}
    for layer in range(2):
        for module, (n_in, n_out) in modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            expected[f"{prefix}.lora_A.weight"] = (8, n_in)
            expected[f"{prefix}.lora_B.weight"] = (n_out, 8)
    assert {name: tensor.shape for name, tensor in tensors.items()} == expected
    assert all(tensor.dtype == np.float32 for tensor in tensors.values())
    adapters = dict(leaf_paths(workflow["resumed"].state.params))
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"],
                                  np.asarray(adapters["blocks/attn/o/lora/a"])[1].reshape(64, 8).T)


def test_adapters_export_in_bfloat16(workflow):
    """`--adapters_only --dtype bfloat16`: the same tensors, each the fp32 one rounded to bf16."""
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    tmp = workflow["tmp"]
    assert cli.main(["checkpoint", "export-hf", workflow["ckpt"], str(tmp / "peft_bf16"), "--adapters_only",
                     "--dtype", "bfloat16"]) == 0
    if not os.path.isdir(tmp / "peft"):
        assert cli.main(["checkpoint", "export-hf", workflow["ckpt"], str(tmp / "peft"), "--adapters_only"]) == 0
    halves = load_torch(str(tmp / "peft_bf16" / "adapter_model.safetensors"))
    wholes = load_file(str(tmp / "peft" / "adapter_model.safetensors"))
    assert set(halves) == set(wholes) and all(t.dtype == torch.bfloat16 for t in halves.values())
    for name, whole in wholes.items():
        assert torch.equal(halves[name], torch.from_numpy(whole).to(torch.bfloat16)), name


def test_eval_and_generate_run_a_lora_checkpoint_as_its_merged_model(workflow, capsys):
    """`eval` and `generate` read a LoRA checkpoint as its base with the adapters merged in: the
    model they build gives the adapter forward's logits (not the base's), and `generate` prints
    what it prints for the checkpoint `merge-lora` writes."""
    from efficient_train.tools.checkpoint_model import load_checkpoint_model

    tmp, ckpt = workflow["tmp"], workflow["ckpt"]
    config = get_config("configs/lora_tiny.py")
    model = load_checkpoint_model(ckpt, config).module()
    graphdef, state = nnx.split(model)
    logits = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, IDS))
    np.testing.assert_allclose(logits, adapter_logits(workflow["resumed"]), rtol=1e-5, atol=1e-5)
    assert np.abs(logits - torch_logits(workflow["hf_model"])).max() > 1e-3  # the adapters moved the base
    merged = str(tmp / "merged_for_generate")
    assert cli.main(["checkpoint", "merge-lora", ckpt, merged]) == 0
    printed = []
    for source in (ckpt, merged):
        capsys.readouterr()
        assert cli.main(["generate", "--checkpoint", source, "--prompt", "def ", "--max_new_tokens", "8",
                         "--temperature", "0"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0].startswith("def ")


def test_lora_tools_refuse_bad_input_with_one_line(workflow, capsys):
    tmp, base, ckpt = workflow["tmp"], workflow["base"], workflow["ckpt"]
    cases = [
        (["checkpoint", "merge-lora", base, str(tmp / "m1")], "is not a LoRA checkpoint"),
        (["checkpoint", "export-hf", base, str(tmp / "p1"), "--adapters_only"], "--adapters_only: "),
        (["checkpoint", "merge-lora", ckpt, base], "DST: "),  # holds a step already
        (["checkpoint", "convert", ckpt, str(tmp / "c1"), "--mesh", "data=1"], "merge-lora"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (argv, err)
        assert not any(os.path.exists(tmp / name) for name in ("m1", "p1", "c1"))
    config = run_config(tmp, ckpt, steps=1)
    config.workdir = str(tmp / "other_run")
    with pytest.raises(CheckpointError, match=r"^finetune\.base: .* is itself a LoRA checkpoint"):
        Trainer(config)
