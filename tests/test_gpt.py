"""Tests of `revjax.GPT` / `revjax.RevGPT` and `revjax.generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_l2

import revjax
from revjax.models import count_params

# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------
#
# GPT-2 small (Hugging Face's GPT2LMHeadModel: 124,439,808 parameters, the head tied to the
# token embedding), D = 768, 12 blocks, vocabulary V = 50,257, context C = 1024:
#   token embedding  V * D                    = 38,597,376
#   position emb.    C * D                    =    786,432
#   per block        LN 2D + qkv (D*3D + 3D) + proj (D*D + D) + LN 2D
#                    + fc1 (D*4D + 4D) + fc2 (4D*D + D) = 12 D^2 + 13 D = 7,087,872
#   12 blocks                                 = 85,054,464
#   final LN         2D                       =      1,536
#   total                                     = 124,439,808
# RevGPT: every unit is one GPT block (F = LN + attention, G = LN + MLP at width D) and the two
# streams are averaged before the same final LN and tied head, so the count is the same.


def _gpt_count(depth: int, d: int, vocab: int, context: int) -> int:
    return 12 * depth * d * d + 13 * depth * d + 2 * d + (vocab + context) * d


PAIRS = {
    "gpt_char_cpu": (4, 128, 65, 64),
    "gpt_char": (6, 384, 65, 256),
    "gpt2_small": (12, 768, 50257, 1024),
    "gpt_1b": (24, 2048, 50257, 2048),
}


def test_param_counts():
    assert _gpt_count(*PAIRS["gpt2_small"]) == 124_439_808  # Hugging Face's GPT-2 small
    for name, shape in PAIRS.items():
        for preset in (name, f"rev{name}"):
            model = nnx.eval_shape(lambda p=preset: revjax.presets.build(p, rngs=nnx.Rngs(0)))
            assert count_params(model) == _gpt_count(*shape), preset
        assert revjax.presets.get(f"rev{name}").twin == name
    # The options keep the count equal: RoPE drops the position embedding, SwiGLU keeps ~it.
    small = dict(vocab_size=11, context_length=8, embed_dim=24, depth=2, num_heads=4)
    for opts in (dict(position="rope"), dict(norm="rmsnorm", bias=False), dict(mlp="swiglu")):
        counts = [
            count_params(nnx.eval_shape(lambda c=cls, o=opts: c(rngs=nnx.Rngs(0), **small, **o)))
            for cls in (revjax.GPT, revjax.RevGPT)
        ]
        assert counts[0] == counts[1], opts
    rope = count_params(nnx.eval_shape(lambda: revjax.GPT(rngs=nnx.Rngs(0), **small,
                                                           position="rope")))
    assert rope == _gpt_count(2, 24, 11, 8) - 8 * 24


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------

# Rolled (unroll=1): each program compiles one unit, not one per unit.
TINY = dict(vocab_size=13, context_length=12, embed_dim=16, depth=2, num_heads=2, unroll=1)
N, T = 2, 12


def _tokens(seed=0, n=N, t=T):
    return jax.random.randint(jax.random.key(seed), (n, t), 0, TINY["vocab_size"])


def _loss(model, tokens):
    logits = model(tokens[:, :-1], train=True, rngs=jax.random.key(5))
    targets = jax.nn.one_hot(tokens[:, 1:], logits.shape[-1], dtype=logits.dtype)
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))


def _grads(model, tokens):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return _loss(nnx.merge(graphdef, p, rest, copy=True), tokens)

    return jax.jit(jax.grad(loss))(params)




@pytest.mark.parametrize(
    "dtype, opts, tol",
    [
        # float64: the rebuild is exact up to the last bits.
        ("float64", dict(arithmetic="float"), 1e-10),
        # float32, fixed point (the default): the same rounded forward both ways; the custom
        # backward's pullbacks are compiled apart from autodiff's, so ~1e-6.
        ("float32", dict(dropout=0.1, attention_dropout=0.1), 1e-4),
        # bfloat16 compute, float32 streams and parameters.
        ("bfloat16", dict(dtype=jnp.bfloat16, position="rope", mlp="swiglu"), 3e-2),
    ],
)
def test_revgpt_gradients_match_plain(dtype, opts, tol):
    """The memory-saving backward's gradients equal plain autodiff's on the same weights."""
    # Flax's norms promote float64 / bfloat16 with float32 inside, which strict promotion
    # rejects: standard promotion for these, as users run.
    with jax.enable_x64(dtype == "float64"), jax.numpy_dtype_promotion("standard"):
        _check_gradients(dtype, opts, tol)


def _check_gradients(dtype, opts, tol):
    param = jnp.float64 if dtype == "float64" else jnp.float32
    model = revjax.RevGPT(rngs=nnx.Rngs(0), **TINY, param_dtype=param, **opts)
    tokens = _tokens()
    rev = _grads(model, tokens)
    model.memory_saving = False
    plain = _grads(model, tokens)
    err = rel_l2(rev, plain)
    assert err < tol, err
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(rev))


@pytest.mark.parametrize("cls", [revjax.GPT, revjax.RevGPT])
def test_causal(cls):
    """A token's logits do not change when later tokens do."""
    model = cls(rngs=nnx.Rngs(1), **TINY, position="rope", attention="plain")
    a = _tokens(1)
    b = a.at[:, 7:].set((a[:, 7:] + 1) % TINY["vocab_size"])
    forward = nnx.jit(lambda m, t: m(t))
    la, lb = forward(model, a), forward(model, b)
    np.testing.assert_array_equal(np.asarray(la[:, :7]), np.asarray(lb[:, :7]))
    assert not np.allclose(np.asarray(la[:, 7:]), np.asarray(lb[:, 7:]))


def test_remat_same_gradients():
    """remat="full" / "dots" change what is stored, not the gradients."""
    model = revjax.GPT(rngs=nnx.Rngs(0), **TINY)
    tokens = _tokens()
    ref = _grads(model, tokens)
    for remat in ("full", "dots"):
        model.remat = remat
        assert rel_l2(_grads(model, tokens), ref) < 1e-6, remat


def test_from_gpt_copies_every_parameter():
    gpt = revjax.GPT(rngs=nnx.Rngs(3), **TINY)
    rev = revjax.RevGPT.from_gpt(gpt, arithmetic="float")
    assert count_params(rev) == count_params(gpt)
    np.testing.assert_array_equal(rev.blocks.f.qkv.kernel[...], gpt.attn.qkv.kernel[...])
    np.testing.assert_array_equal(rev.blocks.g.fc2.bias[...], gpt.mlp.fc2.bias[...])
    np.testing.assert_array_equal(rev.pos_embed[...], gpt.pos_embed[...])
    with pytest.raises(ValueError, match="keeps the GPT's architecture"):
        revjax.RevGPT.from_gpt(gpt, depth=4)


def test_bad_input():
    model = revjax.GPT(rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(ValueError, match="exceed context_length"):
        model(_tokens(t=T + 1))
    with pytest.raises(ValueError, match="integer token ids"):
        model(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        revjax.GPT(rngs=nnx.Rngs(0), **{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="unknown attention"):
        revjax.GPT(rngs=nnx.Rngs(0), **TINY, attention="flash")
    with pytest.raises(ValueError, match="needs randomness"):
        revjax.GPT(rngs=nnx.Rngs(0), **TINY, dropout=0.1)(_tokens(), train=True)


@pytest.mark.parametrize("mlp, approximate", [("gelu", True), ("gelu_exact", False)])
def test_mlp_gelu_forms(mlp, approximate):
    """``mlp="gelu"`` is GPT-2's tanh GELU, ``"gelu_exact"`` the erf GELU (nanoGPT's); the
    two differ on these inputs by more than the tolerance."""
    from revjax._gpt_blocks import BlockSetting, Mlp

    s = BlockSetting(dim=8, num_heads=2, hidden=32, depth=1, bias=True, norm="layernorm",
                     mlp=mlp, rope=False, attention="plain", dropout=0.0, attention_dropout=0.0,
                     dtype=jnp.float32, param_dtype=jnp.float32)
    block = Mlp(s, rngs=nnx.Rngs(0))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    # Unit-scale weights put the pre-activations where the two forms differ (|x| ~ 1 .. 3).
    block.fc1.kernel[...] = jax.random.normal(k1, (8, 32)) / 8**0.5
    block.fc2.kernel[...] = jax.random.normal(k2, (32, 8)) / 32**0.5
    x = jax.random.normal(k3, (2, 5, 8))
    pre = block.fc1(block.norm(x))
    want = block.fc2(jax.nn.gelu(pre, approximate=approximate))
    other = block.fc2(jax.nn.gelu(pre, approximate=not approximate))
    np.testing.assert_allclose(block(x), want, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(want - other))) > 1e-4  # 100x the tolerance above


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [revjax.GPT, revjax.RevGPT])
def test_kv_cache_equals_recompute(cls):
    """Cached decoding gives the full forward's logits, and the same tokens as recomputing the
    whole prefix: greedy and sampled with a fixed key."""
    model = cls(rngs=nnx.Rngs(2), **TINY)
    tokens = _tokens(2)
    cache = model.init_cache(N)
    first, cache = model.decode(tokens[:, :5], cache, 0)
    rest, _ = model.decode(tokens[:, 5:], cache, 5)
    full = model(tokens)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-5)
    # One prompt shape and two samplers (each a compile of the cached and recomputing paths).
    prompt = tokens[:1, :3]
    sampled = dict(temperature=1.0, top_k=5, rngs=jax.random.key(7))
    for kw in (dict(temperature=0.0), sampled):
        cached = revjax.generate(model, prompt, T - 3, **kw)
        again = revjax.generate(model, prompt, T - 3, **kw, use_cache=False)
        np.testing.assert_array_equal(cached, again)
        np.testing.assert_array_equal(cached[:, :3], prompt)
    # Beyond the context the cached path re-encodes the recent tokens and keeps going (a 1-D
    # prompt gives a 1-D result).
    long = revjax.generate(model, prompt[0], 2 * T, **sampled)
    assert long.shape == (3 + 2 * T,) and int(long.max()) < TINY["vocab_size"]
    np.testing.assert_array_equal(long[:T], cached[0])  # the same key: the same first tokens
    with pytest.raises(ValueError, match="needs randomness"):
        revjax.generate(model, prompt, 2)
