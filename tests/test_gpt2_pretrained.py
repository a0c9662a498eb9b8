"""Tests of `revjax.pretrained.load_gpt2` / `save_gpt2`: Hugging Face GPT-2 into `revjax.GPT`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax.pretrained import CheckpointMismatch, gpt2_state_dict, load_gpt2, save_gpt2

TINY = dict(vocab_size=29, context_length=16, embed_dim=24, depth=2, num_heads=3, unroll=1)


_forward = nnx.jit(lambda model, tokens: model(tokens))


def _tokens():
    return jax.random.randint(jax.random.key(0), (2, 16), 0, TINY["vocab_size"])


@pytest.mark.parametrize("mlp, activation", [("gelu", "gelu_new"), ("gelu_exact", "gelu")])
def test_save_and_load_round_trip(tmp_path, mlp, activation):
    model = revjax.GPT(rngs=nnx.Rngs(4), **TINY, mlp=mlp)
    save_gpt2(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == activation  # Hugging Face's name for this GELU
    again = load_gpt2(tmp_path, unroll=1)
    assert again.options.mlp == mlp
    # Every parameter back bit for bit, so the same function (no compile needed to see it).
    saved, loaded = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
    assert jax.tree.structure(saved) == jax.tree.structure(loaded)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    state = gpt2_state_dict(model)
    assert state["transformer.h.1.attn.c_attn.weight"].shape == (24, 72)  # Conv1D: [in, out]
    del state["transformer.h.0.ln_2.bias"]
    state["transformer.h.0.extra"] = state["transformer.ln_f.bias"]
    from safetensors.numpy import save_file

    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatch, match="2 difference") as info:
        load_gpt2(tmp_path / "bad.safetensors")
    assert "missing tensor h.0.ln_2.bias" in str(info.value)
    with pytest.raises(ValueError, match="Only GPT-2's layout"):
        gpt2_state_dict(revjax.GPT(rngs=nnx.Rngs(0), **TINY, position="rope"))
    with pytest.raises(ValueError, match="swiglu"):
        save_gpt2(revjax.GPT(rngs=nnx.Rngs(0), **TINY, mlp="swiglu"), tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_load_names_the_activations_it_cannot_represent(tmp_path):
    """A GELU `revjax.GPT` lacks, or an ``mlp=`` that contradicts ``config.json``: a
    CheckpointMismatch naming both, listed with the tensors' problems; nothing built."""
    save_gpt2(revjax.GPT(rngs=nnx.Rngs(0), **TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for activation in ("relu", "quick_gelu"):
        (tmp_path / "config.json").write_text(json.dumps(
            dict(config, activation_function=activation, layer_norm_epsilon=1e-6)))
        with pytest.raises(CheckpointMismatch, match="2 difference") as info:
            load_gpt2(tmp_path)
        message = str(info.value)
        assert f"activation_function={activation!r}" in message and "gelu_new" in message
        assert "layer_norm_epsilon=1e-06" in message
    (tmp_path / "config.json").write_text(json.dumps(config))  # "gelu_new": the tanh GELU
    with pytest.raises(CheckpointMismatch, match="mlp='gelu_exact' given"):
        load_gpt2(tmp_path, mlp="gelu_exact")
    # Without a config.json the caller names the GELU (default GPT-2's tanh form).
    (tmp_path / "config.json").unlink()
    weights = tmp_path / "model.safetensors"
    assert load_gpt2(weights, num_heads=3, mlp="gelu_exact").options.mlp == "gelu_exact"
    assert load_gpt2(weights, num_heads=3).options.mlp == "gelu"
    with pytest.raises(CheckpointMismatch, match="GELU one"):
        load_gpt2(weights, num_heads=3, mlp="swiglu")


# Hugging Face's tanh GELU (GPT-2's default) and its exact erf GELU ("gelu", nn.GELU()).
@pytest.mark.parametrize("activation, mlp", [("gelu_new", "gelu"), ("gelu", "gelu_exact")])
def test_logits_equal_transformers(tmp_path, activation, mlp):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (the pretrained-test extra has it)"
    )
    torch = pytest.importorskip("torch")
    config = transformers.GPT2Config(
        vocab_size=29, n_positions=16, n_embd=24, n_layer=2, n_head=3, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        activation_function=activation, initializer_range=0.3,
    )  # weights 15x GPT-2's scale: the two GELUs' logits then differ by ~2e-3, 400x the tolerance
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_gpt2(tmp_path / "hf", unroll=1)
    assert model.options.mlp == mlp
    tokens = np.array(_tokens())  # writable, for torch
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens).long()).logits.numpy()
    got = np.asarray(_forward(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)
    # And back: the exported tensors are GPT2LMHeadModel's, names and layout.
    back = transformers.GPT2LMHeadModel(config).eval()
    exported = {k: torch.tensor(np.array(v)) for k, v in gpt2_state_dict(model).items()}
    result = back.load_state_dict(exported, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    back.tie_weights()
    with torch.no_grad():
        again = back(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-5)
