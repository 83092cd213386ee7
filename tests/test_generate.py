"""Sampling: KV-cache decoding against the full forward pass, the sampling rules, the mesh,
prompts through tokenizers, and the `generate` command on a saved checkpoint."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_train import cli
from efficient_train.data.tokenizer import load_tokenizer
from efficient_train.generate import SamplingOptions, complete, generate
from efficient_train.generate.decode import forward as decode_forward
from efficient_train.generate.decode import init_cache, left_pad
from efficient_train.generate.sampling import next_token
from efficient_train.models import Llama, ModelConfig
from tests.support.data_setup import make_tokenizer
from tests.support.zero_setup import small_config

PROMPTS = [[5, 9, 13, 200, 7, 64, 1], [42, 3], [250]]


# Family fields that change the forward pass (models/llama/config.py): decoding must compute each.
GEMMA_LIKE = {"model.num_layers": 3, "model.sliding_window": 4, "model.global_every": 3, "model.local_rope_theta": 100.0,
              "model.activation": "gelu_tanh", "model.norm_plus_one": True, "model.embed_scale": True,
              "model.sandwich_norms": True, "model.query_pre_attn_scalar": 8.0, "model.attn_softcap": 20.0,
              "model.final_softcap": 5.0, "model.qk_norm": True, "model.tie_embeddings": True}
QWEN_LIKE = {"model.qkv_bias": True, "model.o_bias": True, "model.rope_type": "yarn", "model.rope_factor": 4.0,
             "model.rope_original_context": 8}


def _model(**family: object) -> Llama:
    """A two-layer byte-level Llama (with `family` fields), initialized in one compiled call."""
    config = small_config(**{"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_heads": 2,
                             "model.num_kv_heads": 1, "model.head_dim": 16, **family})
    model_config = ModelConfig.from_config_dict(config.model, attention_impl="xla")
    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0))))[0]
        return nnx.merge(graphdef, jax.jit(lambda: nnx.split(Llama(model_config, rngs=nnx.Rngs(0)))[1])())


@jax.jit
def _argmax_logits(model: Llama, tokens: jax.Array, positions: jax.Array, segments: jax.Array) -> jax.Array:
    return jnp.argmax(model(tokens, positions, segments), axis=-1)


def _full_forward_argmax(model: Llama, prompts: list[list[int]], generated: list[list[int]]) -> list[list[int]]:
    """The full forward pass's argmax at each generated token's position, every row left-padded
    as decoding pads it."""
    tokens, positions, segments, _ = left_pad([p + g for p, g in zip(prompts, generated)])
    best = np.asarray(_argmax_logits(model, tokens, positions, segments))
    width = tokens.shape[1]
    return [best[row, width - len(g) - 1: width - 1].tolist() for row, g in enumerate(generated)]


@pytest.mark.slow
def test_greedy_decoding_is_the_full_forward_argmax_at_every_position():
    """Prompts of 7, 2 and 1 tokens in one left-padded batch: every token greedy decoding emits
    (through the prefill and the cached single-token steps) is the argmax of the full forward
    pass over the prompt plus the tokens before it."""
    model = _model()
    generated = generate(model, PROMPTS, max_new_tokens=8, options=SamplingOptions(temperature=0))
    assert [len(g) for g in generated] == [8, 8, 8]
    assert generated == _full_forward_argmax(model, PROMPTS, generated)
    # A row decoded alone equals its row in the batch: padding is never attended.
    assert generate(model, PROMPTS[1:2], max_new_tokens=8, options=SamplingOptions(temperature=0)) == generated[1:2]


@pytest.mark.parametrize("family", [GEMMA_LIKE, QWEN_LIKE], ids=["gemma_like", "qwen_like"])
@pytest.mark.slow
def test_greedy_decoding_computes_every_family_field(family):
    """Sliding windows shorter than the decoded text, local RoPE, soft-caps, embedding scale,
    sandwich and (1 + w) norms, q/k norms, biases and YaRN: the cached decode is the full
    forward's argmax at every position, and the prefill's logits are the full forward's
    (the final soft-cap keeps the argmax, so logits are compared too)."""
    model = _model(**family)
    tokens, positions, segments, _ = left_pad(PROMPTS)
    cache = init_cache(model.cfg, len(PROMPTS), tokens.shape[1])
    prefill, _ = nnx.jit(decode_forward)(model, cache, tokens, positions, segments)
    visible = segments.astype(bool)
    np.testing.assert_allclose(np.asarray(prefill)[visible], np.asarray(nnx.jit(Llama.__call__)(
        model, tokens, positions, segments))[visible], rtol=1e-5, atol=1e-5)
    generated = generate(model, PROMPTS, max_new_tokens=10, options=SamplingOptions(temperature=0))
    assert generated == _full_forward_argmax(model, PROMPTS, generated)


@pytest.mark.slow
def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.key(0)
    assert set(np.asarray(next_token(logits, key, SamplingOptions(temperature=0))).tolist()) == {0}
    assert set(np.asarray(next_token(logits, key, SamplingOptions(top_k=1))).tolist()) == {0}
    top2 = np.bincount(np.asarray(next_token(logits, key, SamplingOptions(top_k=2))), minlength=4) / 4000
    assert top2[2:].sum() == 0 and top2[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    # top_p 0.7: 0.5 alone falls short, 0.5 + 0.3 reaches it; the rest is cut.
    nucleus = np.bincount(np.asarray(next_token(logits, key, SamplingOptions(top_p=0.7))), minlength=4) / 4000
    assert nucleus[2:].sum() == 0 and nucleus[1] == pytest.approx(0.3 / 0.8, abs=0.03)
    plain = np.bincount(np.asarray(next_token(logits, key, SamplingOptions())), minlength=4) / 4000
    assert np.allclose(plain, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    for bad, flag in ((SamplingOptions(temperature=-1), "--temperature"), (SamplingOptions(top_p=0), "--top_p"),
                      (SamplingOptions(top_k=-2), "--top_k")):
        with pytest.raises(ValueError, match=flag):
            bad.check()


def test_prompts_through_a_tokenizer(tmp_path):
    """A prompt starts a document (bos) and is never closed (no eos), though this tokenizer's
    documents get both; byte-level prompts are their UTF-8 bytes."""
    tokenizer = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    ids = tokenizer.encode_prompt("The quick brown fox").tolist()
    assert ids[0] == tokenizer.bos_id and tokenizer.eos_id not in ids
    assert tokenizer.encode_documents(["The quick brown fox"])[0].tolist() == ids + [tokenizer.eos_id]
    assert tokenizer.decode(ids[1:]) == "The quick brown fox"
    bytes_level = load_tokenizer("")
    assert bytes_level.encode_prompt("né").tolist() == list("né".encode())
    assert bytes_level.decode(list("né".encode()) + [300]) == "né\ufffd"


@pytest.mark.slow
def test_decoding_on_a_sharded_mesh_equals_one_device():
    """Parameters in the training plan's shardings (tensor-parallel heads and MLP, ZeRO-3 shards)
    decode to the same tokens as on one device, for both layer layouts."""
    from efficient_train.parallel.mesh import make_mesh
    from efficient_train.train.state import bind
    from efficient_train.train.training_setup import build_setup, init_state

    for scan_layers in (True, False):
        config = small_config(**{"model.scan_layers": scan_layers, "mesh.data": 4, "mesh.tensor": 2,
                                 "zero_stage": 3, "attention.impl": "xla"})
        setup = build_setup(config, make_mesh({"replica": 1, "data": 4, "sequence": 1, "tensor": 2}))
        step_def, params = setup.step_def, init_state(setup).params
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
        sharded = bind(step_def.graphdef, step_def.param_structure, params, step_def.rest)
        local = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), params)
        alone = bind(step_def.graphdef, step_def.param_structure, local, step_def.rest)
        greedy = SamplingOptions(temperature=0)
        on_mesh = generate(sharded, PROMPTS + [[17, 18]], max_new_tokens=6, options=greedy)
        assert on_mesh == generate(alone, PROMPTS + [[17, 18]], max_new_tokens=6, options=greedy)
        assert on_mesh == _full_forward_argmax(alone, PROMPTS + [[17, 18]], on_mesh)
        sampled = dict(options=SamplingOptions(temperature=1.0, top_k=20), seed=3)
        assert generate(sharded, PROMPTS, max_new_tokens=6, **sampled) == generate(alone, PROMPTS, max_new_tokens=6,
                                                                                   **sampled)


@pytest.mark.slow
def test_generate_command_on_a_checkpoint(tmp_path, capsys):
    """`efficient-train generate` on a byte-level run's checkpoint prints each prompt and its
    continuation; greedy output is what `complete` gives for the trained parameters. The run's
    sample hook (sample.every=2, temperature 0.8 but sample.top_k=1, so greedy) printed the same
    continuation at its last step."""
    from efficient_train import Trainer

    config = small_config(**{"train.steps": 2, "mesh.data": 8, "data.source": "text", "model.vocab_size": 256,
                             "sample.every": 2, "sample.prompt": "def ", "sample.max_new_tokens": 12,
                             "sample.temperature": 0.8, "sample.top_k": 1, "sample.seed": 5})
    config.workdir = str(tmp_path / "run")
    trainer = Trainer(config)
    trainer.fit()
    from efficient_train.train.state import bind

    step_def = trainer.setup.step_def
    expected = complete(bind(step_def.graphdef, step_def.param_structure, trainer.state.params, step_def.rest),
                        ["def ", "import o"], max_new_tokens=12, options=SamplingOptions(temperature=0))
    assert f"sample step 2: 'def ' -> {expected[0]!r}" in capsys.readouterr().out.splitlines()
    # The model's fields (hidden size 64, 2 layers) come from the checkpoint, not the default config.
    code = cli.main(["generate", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--prompt", "def ",
                     "--prompt", "import o", "--max_new_tokens", "12", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert out == f"def {expected[0]}\n\n---\nimport o{expected[1]}\n"


def test_generate_command_refuses_bad_flags_in_one_line(tmp_path, capsys):
    for flags, field in ((["--temperature", "-0.5"], "--temperature"), (["--top_p", "1.5"], "--top_p"),
                         (["--max_new_tokens", "0"], "--max_new_tokens"), ([], "--checkpoint")):
        code = cli.main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {field}"), err
