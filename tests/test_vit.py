"""Tests of `revjax.RevViT` / `revjax.ViT` and the trainer's transformer options."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import train_in_child

import revjax
from revjax import train, vit
from revjax.models import count_params
from revjax.train import TrainConfig

# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------
#
# ViT-B/16 with a class token (timm's vit_base_patch16_224: 86,567,656 parameters), D = 768,
# 12 blocks, MLP 4D, 1000 classes, 224 / 16 = 14, so 196 patches + 1 class token:
#   patch embedding  16*16*3*D + D            =    590,592
#   class token      D                        =        768
#   position emb.    197 * D                  =    151,296
#   per block        LN 2D + qkv (D*3D + 3D) + proj (D*D + D) + LN 2D
#                    + fc1 (D*4D + 4D) + fc2 (4D*D + D) = 12 D^2 + 13 D = 7,087,872
#   12 blocks                                 = 85,054,464
#   final LN         2D                       =      1,536
#   head             D*1000 + 1000            =    769,000
#   total                                     = 86,567,656
# The same rules give 5,717,416 for D = 192 (timm's vit_tiny_patch16_224) and 22,050,664 for
# D = 384 (vit_small_patch16_224): the reference counts timm reports for these models.
# pool="mean" drops the class token and its position entry (-2D). RevViT (mean pooling) has the
# same blocks (F = LN + attention, G = LN + MLP) but a final LN over 2D (+2D) and a head from
# 2D features (+1000 D): ViT-mean + 2D + 1000 D.


def _vit_count(d: int, classes: int = 1000, tokens: int = 196, depth: int = 12, cls=True) -> int:
    patch = 16 * 16 * 3 * d + d
    block = 12 * d * d + 13 * d
    extra = d + (tokens + 1) * d if cls else tokens * d
    return patch + extra + depth * block + 2 * d + d * classes + classes


@pytest.mark.parametrize(
    "size, dim, timm_count",
    [("ti", 192, 5_717_416), ("s", 384, 22_050_664), ("b", 768, 86_567_656)],
)
def test_param_counts(size, dim, timm_count):
    assert _vit_count(dim) == timm_count  # the derivation above reproduces the reference

    def count(preset, **kw):
        return count_params(nnx.eval_shape(lambda: preset(rngs=nnx.Rngs(0), **kw)))

    vit_preset = getattr(revjax, f"vit_{size}16")
    assert count(vit_preset, pool="cls") == timm_count
    assert count(vit_preset) == timm_count - 2 * dim  # pool="mean" (the default)
    rev = count(getattr(revjax, f"revvit_{size}16"))
    assert rev == timm_count - 2 * dim + 2 * dim + 1000 * dim


# --------------------------------------------------------------------------------------------
# Gradients: reversible == plain autodiff on the same weights and the same dropout key
# --------------------------------------------------------------------------------------------

# Two blocks: the first block's input is rebuilt from the second's output, with every kind of
# randomness (dropout, attention dropout, drop path) replayed in the rebuild.
TINY = dict(in_channels=1, depth=2, dropout=0.1, attention_dropout=0.1, drop_path_rate=0.2)


def _grads(model, x, key):
    """Gradients w.r.t. parameters and input of a loss touching every logit, jitted."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grad(params, x):
        def loss(params, x):
            logits = nnx.merge(graphdef, params, rest, copy=True)(x, train=True, rngs=key)
            return jnp.sum(jnp.sin(logits))

        return jax.grad(loss, argnums=(0, 1))(params, x)

    return grad(params, x)


@pytest.fixture(scope="module")
def f64_grads():
    # Flax's LayerNorm promotes float64 with float32 internally, which strict promotion
    # rejects: standard promotion for this computation only.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = revjax.revvit_tiny(param_dtype=jnp.float64, **TINY, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1), jnp.float64)
        key = jax.random.key(2)
        rev = _grads(model, x, key)
        model.memory_saving = False
        plain = _grads(model, x, key)
    # Returned outside the `with`: a yield inside it would leak x64 and standard promotion
    # into every later test of this module.
    return rev, plain


def test_revvit_gradients_float64(f64_grads):
    rev, plain = f64_grads
    assert jax.tree.leaves(rev)[0].dtype == jnp.float64
    with jax.enable_x64(True):
        for a, b in zip(rev, plain):  # parameters, then the input
            assert float(revjax.relative_error(a, b)) <= 1e-10
            assert float(jnp.max(jnp.abs(jax.tree.leaves(b)[0]))) > 0  # not trivially zero


@pytest.fixture(scope="module")
def tiny_models():
    return {
        "vit": revjax.vit_tiny(**TINY, rngs=nnx.Rngs(0)),
        "revvit": revjax.revvit_tiny(**TINY, rngs=nnx.Rngs(0)),
        "vit_cls": revjax.vit_tiny(**TINY, pool="cls", rngs=nnx.Rngs(0)),
    }


def test_revvit_gradients_float32(tiny_models):
    model = nnx.clone(tiny_models["revvit"])  # one initialisation per module
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    rev = _grads(model, x, jax.random.key(2))
    model.memory_saving = False
    plain = _grads(model, x, jax.random.key(2))
    # float32: the rebuilt streams carry ~1e-7 relative rounding per block; 2 blocks stay
    # well below 1e-5 (a wrong key or a missing term shows up at 1e-2 or more).
    for a, b in zip(rev, plain):
        assert float(revjax.relative_error(a, b)) <= 1e-5


# --------------------------------------------------------------------------------------------
# Forward behaviour and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "revvit", "vit_cls"])
def test_dropout_keyed_and_eval_deterministic(tiny_models, name):
    model = tiny_models[name]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    evals = model(x), model(x, train=False, rngs=jax.random.key(5))
    np.testing.assert_array_equal(evals[0], evals[1])  # eval ignores the key
    assert evals[0].shape == (2, 10) and evals[0].dtype == jnp.float32
    a = model(x, train=True, rngs=jax.random.key(3))
    a2 = model(x, train=True, rngs=jax.random.key(3))
    c = model(x, train=True, rngs=jax.random.key(4))
    np.testing.assert_array_equal(a, a2)  # the same key, the same masks
    assert not np.allclose(a, c) and not np.allclose(a, evals[0])
    b = model(x, train=True, rngs=nnx.Rngs(dropout=3))  # an nnx.Rngs works too
    assert not np.allclose(b, evals[0])
    with pytest.raises(ValueError, match="needs randomness"):
        model(x, train=True)


def test_functional_path(tiny_models):
    model = tiny_models["revvit"]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    graphdef, params, rest = revjax.functional(model)  # rest: the block indices
    logits, new_rest = revjax.apply(graphdef, params, rest, x, train=False)
    np.testing.assert_array_equal(logits, model(x))
    assert jax.tree.structure(new_rest) == jax.tree.structure(rest)


def test_bfloat16_compute_keeps_float32_streams():
    # Flax's LayerNorm promotes its bfloat16 input with float32 internally, which the suite's
    # strict promotion rejects; users run with JAX's standard promotion, as here.
    with jax.numpy_dtype_promotion("standard"):
        _check_bfloat16_streams()


def _check_bfloat16_streams():
    # Dtypes only: an abstract model and abstract evaluation, nothing compiled.
    model = nnx.eval_shape(
        lambda: revjax.revvit_tiny(in_channels=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    assert model.carry_dtype == jnp.float32 and model.blocks.f.qkv.kernel.dtype == jnp.float32
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    (y1, y2), logits = nnx.eval_shape(lambda m, x: (m.streams(x), m(x)), model, x)
    assert y1.dtype == y2.dtype == jnp.float32
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=10, patch_size=4), "not divisible by patch_size"),
        (dict(embed_dim=30, num_heads=4), "not divisible by num_heads"),
        (dict(depth=0), "depth must be a positive int"),
        (dict(dropout=1.0), "dropout must lie in"),
        (dict(pool="max"), "unknown pool"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        revjax.vit_tiny(**kwargs, rngs=nnx.Rngs(0))


def test_input_errors(tiny_models):
    model = tiny_models["revvit"]
    with pytest.raises(ValueError, match="built for 8x8"):
        model(jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="rank 4"):
        model(jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match=r"channels-first \(NCHW\).*Transpose to NHWC"):
        model(jnp.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="floating-point"):
        model(jnp.zeros((1, 8, 8, 1), jnp.int32))
    with pytest.raises(ValueError, match="exact_every"):
        revjax.revvit_tiny(exact_every=0, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# Trainer options
# --------------------------------------------------------------------------------------------


def test_warmup_cosine_schedule_matches_optax():
    cfg = TrainConfig(
        learning_rate=1e-3, lr_schedule="cosine", warmup_steps=10, num_steps=100,
        end_learning_rate=1e-5,
    )
    ours = train.learning_rate_schedule(cfg)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100, 1e-5)
    steps = [0, 1, 5, 9, 10, 11, 30, 55, 99, 100, 150]
    with jax.numpy_dtype_promotion("standard"):  # optax's schedule mixes int and float
        expected = [float(ref(s)) for s in steps]
    got = [float(ours(jnp.int32(s))) for s in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
    assert got[0] == 0.0 and got[steps.index(10)] == pytest.approx(1e-3)
    assert got[-1] == pytest.approx(1e-5)


def test_warmup_start_nanogpt_ramps_from_one_step_above_zero():
    """``warmup_start="nanogpt"``: step t of the warmup at (t + 1) / (warmup + 1) of the rate;
    the default starts at 0; an unknown start is refused by the config and by `with_warmup`."""
    cfg = TrainConfig(learning_rate=0.1, warmup_steps=4, lr_boundaries=(10,), lr_decay=0.1,
                      warmup_start="nanogpt")
    lr = train.learning_rate_schedule(cfg)
    got = [float(lr(s)) for s in (0, 1, 3, 4, 9, 10)]
    np.testing.assert_allclose(got, [0.02, 0.04, 0.08, 0.1, 0.1, 0.01], rtol=1e-6)
    with pytest.raises(train.ConfigError, match="warmup_start='one' is invalid: expected a "
                       "known warmup start: zero, nanogpt"):
        TrainConfig(warmup_start="one")
    from revjax.train.optim import with_warmup

    with pytest.raises(ValueError, match="start='one' is not a warmup start"):
        with_warmup(lambda t: 1.0, 4, start="one")


def test_warmup_then_piecewise():
    cfg = TrainConfig(learning_rate=0.1, warmup_steps=4, lr_boundaries=(10,), lr_decay=0.1)
    lr = train.learning_rate_schedule(cfg)
    got = [float(lr(s)) for s in (0, 2, 4, 9, 10)]
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.1, 0.01], rtol=1e-6)


def test_label_smoothing_loss_value():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = jnp.array([0, 2])
    a, k = 0.1, 3
    logp = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    target = np.full((2, k), a / k) + (1 - a) * np.eye(k)[np.asarray(labels)]
    expected = -(target * logp).sum(-1)
    np.testing.assert_allclose(train.cross_entropy(logits, labels, a), expected, rtol=1e-6)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_array_equal(train.cross_entropy(logits, labels), plain)


def test_gradient_clipping_by_global_norm():
    cfg = TrainConfig(learning_rate=1.0, momentum=0.0, weight_decay=0.0, lr_boundaries=(),
                      grad_clip_norm=2.0)
    tx = train.make_optimizer(cfg)
    params = {"a": {"kernel": jnp.zeros(3)}, "b": {"bias": jnp.zeros(4)}}
    grads = {"a": {"kernel": jnp.full(3, 3.0)}, "b": {"bias": jnp.full(4, 4.0)}}  # norm 8.54
    updates, _ = tx.update(grads, tx.init(params), params)
    scale = 2.0 / float(optax.tree.norm(grads))  # the whole gradient shrinks by one factor
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_allclose(u, -scale * g, rtol=1e-6)
    assert float(optax.tree.norm(updates)) == pytest.approx(2.0, rel=1e-6)
    small = jax.tree.map(lambda g: g / 100, grads)  # below the norm: unchanged
    updates, _ = tx.update(small, tx.init(params), params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(small)):
        np.testing.assert_allclose(u, -g, rtol=1e-6)


def test_adamw_decoupled_masked_weight_decay():
    cfg = TrainConfig(optimizer="adamw", learning_rate=0.1, weight_decay=0.5, lr_boundaries=())
    tx = train.make_optimizer(cfg)
    params = {
        "fc": {"kernel": jnp.array([2.0, -4.0]), "bias": jnp.array([1.0])},
        "pos_embed": jnp.array([3.0]),
    }
    state = tx.init(params)
    # Zero gradient: Adam's step is 0, so only the decoupled decay moves the weights, by
    # -lr * wd * w on kernels and not at all elsewhere (it is not added to the gradient).
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["fc"]["kernel"], [-0.1, 0.2], rtol=1e-6)
    assert float(updates["fc"]["bias"][0]) == 0.0 and float(updates["pos_embed"][0]) == 0.0
    # A gradient: Adam's first step is lr * sign(g) (bias-corrected m / sqrt(v)), whatever |g|.
    grads = {"fc": {"kernel": jnp.array([5.0, 0.01]), "bias": jnp.array([-2.0])},
             "pos_embed": jnp.array([1e-3])}
    updates, _ = train.make_optimizer(cfg).update(grads, tx.init(params), params)
    # kernel: -lr * (sign(g) + wd * w) = -0.1 * ([1, 1] + 0.5 * [2, -4]) = [-0.2, 0.1]
    np.testing.assert_allclose(updates["fc"]["kernel"], [-0.2, 0.1], rtol=1e-4)
    np.testing.assert_allclose(updates["fc"]["bias"], [0.1], rtol=1e-4)


def test_option_errors():
    for change, match in [
        (dict(optimizer="adam"), "optimizer"),
        (dict(lr_schedule="linear"), "lr_schedule"),
        (dict(lr_schedule="cosine", warmup_steps=10, num_steps=10), "warmup_steps"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(grad_clip_norm=0.0), "grad_clip_norm"),
        (dict(compute_dtype="int8"), "compute_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            train.make_optimizer(dataclasses.replace(TrainConfig(), **change))


def test_compute_dtype_option_builds_mixed_precision():
    cfg = TrainConfig(model="revvit_tiny", compute_dtype="bfloat16")
    graphdef, state, _ = train.create_train_state(cfg, num_classes=10, in_channels=1)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    assert model.dtype == jnp.bfloat16 and model.carry_dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


# --------------------------------------------------------------------------------------------
# The whole trainer: a tiny RevViT learns digits with AdamW + cosine
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole training run; the core set checks RevViT's gradients and one step
def test_revvit_digits_reaches_90_percent(tmp_path):
    from experiments.configs.digits_revvit import get_config

    # The shipped config, without its periodic evals and checkpoints.
    cfg = dataclasses.replace(
        get_config(), eval_every=0, checkpoint_every=0, memory_report=False, num_devices=1
    )
    result = train_in_child(cfg, tmp_path / "work")  # execution-bound: XLA level 1
    assert result["eval_accuracy"] >= 0.90, result
    assert result["learning_rate"] < 1e-4  # the cosine ends near 0


def test_presets_listed():
    for name in vit.__all__:
        assert name in revjax.__all__ and getattr(revjax, name) is getattr(vit, name)
