"""Tests of the model zoo (`revjax.models`): parameter counts, gradients, BatchNorm, memory.

Models are tiny (widths 8/16, 8x8 images, batch 4) and every compiled step is built once per
module: XLA:CPU compilation dominates the run time on a 2-core machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from revjax import models, relative_error
from revjax.models import ResNet, RevNet

# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------

# The paper's table (trainable parameters of the official code). How they arise, e.g.
# revnet38: see the derivation in the `revjax.models` docstring. Structural facts the counts
# pin down: the network's first unit's F has no leading BN (32 fewer for revnet38 otherwise),
# the head has a BN, every entry unit of a bottleneck RevNet whose width or stride changes has
# one 1x1 projection conv per half, and bottleneck stage widths are x4 but the stem's is not.
PARAM_COUNTS = {
    ("resnet32", 10): 464_154,
    ("resnet32", 100): 470_004,
    ("revnet38", 10): 464_890,
    ("revnet38", 100): 475_060,
    ("resnet110", 10): 1_727_962,
    ("resnet110", 100): 1_733_812,
    ("revnet110", 10): 1_729_194,
    ("revnet110", 100): 1_740_804,
    ("resnet164", 10): 1_703_258,
    ("resnet164", 100): 1_726_388,
    ("revnet164", 10): 1_748_778,
    ("revnet164", 100): 1_794_948,
    ("resnet101", 1000): 44_541_480,
    ("revnet104", 1000): 45_428_072,
}


@pytest.mark.parametrize(("preset", "num_classes"), sorted(PARAM_COUNTS))
def test_preset_param_counts(preset, num_classes):
    build = getattr(models, preset)
    # Abstract: ImageNet models are not allocated.
    model = nnx.eval_shape(lambda: build(num_classes, rngs=nnx.Rngs(0)))
    assert models.count_params(model) == PARAM_COUNTS[preset, num_classes]


@pytest.mark.parametrize("preset", ["resnet50", "revnet56"])
def test_imagenet_extras_build(preset):
    model = nnx.eval_shape(lambda: getattr(models, preset)(rngs=nnx.Rngs(0)))
    assert model.num_classes == 1000
    assert models.count_params(model) > 20_000_000


def test_presets_are_listed():
    for name in [
        "resnet32",
        "revnet38",
        "resnet110",
        "revnet110",
        "resnet164",
        "revnet164",
        "resnet50",
        "revnet56",
        "resnet101",
        "revnet104",
        "revnet_tiny",
        "resnet_tiny",
        "RevNet",
        "ResNet",
        "functional",
        "apply",
        "count_params",
    ]:
        assert name in models.__all__
        assert hasattr(models, name)


def test_preset_registry():
    """One registry: every preset constructor of `revjax` is in it, each reversible preset's
    twin is the non-reversible model of the same family, and names resolve with suggestions."""
    import revjax
    from revjax import gpt, presets, vit

    constructors = [n for n in revjax.__all__ if n[0].islower() and n in presets.names()]
    assert set(presets.names()) == set(constructors)
    assert presets.twins()["revnet38"] == "resnet32"
    assert presets.twins()["revnet104"] == "resnet101"
    for rev, twin in presets.twins().items():
        pair = (presets.get(rev).cls, presets.get(twin).cls)
        assert pair in ((RevNet, ResNet), (vit.RevViT, vit.ViT), (gpt.RevGPT, gpt.GPT)), (rev, twin)
        assert presets.get(rev).reversible and not presets.get(twin).reversible
        assert presets.get(rev).image_size == presets.get(twin).image_size
    for name in presets.names():
        preset = presets.get(name)
        assert getattr(revjax, name).__name__ == name
        assert (preset.twin is not None) == preset.reversible
    assert presets.get("revnet104").num_classes == 1000 and presets.get("vit_tiny").image_size == 8
    assert presets.get("revvit_tiny").accepts("image_size")
    assert not presets.get("revnet38").accepts("image_size")
    model = nnx.eval_shape(lambda: presets.build("revnet38", 100, rngs=nnx.Rngs(0)))
    assert models.count_params(model) == PARAM_COUNTS["revnet38", 100]
    model = nnx.eval_shape(lambda: presets.build("revnet38", rngs=nnx.Rngs(0), in_channels=1))
    assert model.in_channels == 1 and model.num_classes == 10
    with pytest.raises(ValueError, match="Did you mean 'revnet38'"):
        presets.get("revnet39")
    with pytest.raises(ValueError, match="registered already"):
        presets.register("revnet38", RevNet, "again", units_per_stage=(1,), widths=(8, 8))


# --------------------------------------------------------------------------------------------
# Shared tiny models and data
# --------------------------------------------------------------------------------------------

BATCH, SIZE = 4, 8
# One stage of 3 units (a rebuilt unit between two others) whose entry unit strides and
# widens: every kind of unit in a program small enough to compile in seconds.
TINY = dict(units_per_stage=(3,), widths=(8, 16), strides=(2,))


def _data(dtype):
    x = jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 3), dtype)
    y = jnp.arange(BATCH) % 10
    return x, y


def _tiny(block, dtype=jnp.float32, **kw):
    return models.revnet_tiny(rngs=nnx.Rngs(0), block=block, param_dtype=dtype, **TINY, **kw)


def _cast_model(model, block, dtype):
    """The same weights in another dtype (cheaper than a second random init on XLA:CPU)."""
    target = nnx.eval_shape(lambda: _tiny(block, dtype))
    nnx.update(target, jax.tree.map(lambda a: a.astype(dtype), nnx.state(model)))
    return target


def _train_grads(model, x, y, variants):
    """Loss gradients and new batch statistics of one train step per model variant.

    ``variants`` maps a name to attribute overrides (e.g. ``{"memory_saving": False}``); all
    variants share the weights and run in one compiled function.
    """
    graphdefs = {}
    for name, attrs in variants.items():
        clone = nnx.clone(model)
        for key, value in attrs.items():
            setattr(clone, key, value)
        graphdefs[name], params, batch_stats = models.functional(clone)

    def step(params, batch_stats, x, y):
        out = {}
        for name, graphdef in graphdefs.items():

            def loss(p, graphdef=graphdef):
                logits, new_stats = models.apply(graphdef, p, batch_stats, x, train=True)
                xent = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                return jnp.mean(xent), new_stats

            (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
            out[name] = (value, grads, new_stats)
        return out

    return jax.jit(step)(params, batch_stats, x, y), batch_stats


@pytest.fixture(scope="module")
def f32_models():
    return {block: _tiny(block) for block in ("basic", "bottleneck")}


@pytest.fixture(scope="module")
def f32_results(f32_models):
    x, y = _data(jnp.float32)
    variants = {"saving": {}, "plain": {"memory_saving": False}}
    # Stored transitions (the paper's code; rematerialised is the default) only for
    # bottleneck (projection shortcuts), to save compiles.
    remat = {**variants, "stored": {"remat_transitions": False}}
    return {
        b: _train_grads(m, x, y, remat if b == "bottleneck" else variants)
        for b, m in f32_models.items()
    }


# --------------------------------------------------------------------------------------------
# Gradients and BatchNorm statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_gradients_float64(block, f32_models):
    # Flax's BatchNorm promotes its statistics with float32 (jnp.promote_types), which strict
    # promotion rejects for float64: allow standard promotion for this test only.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = _cast_model(f32_models[block], block, jnp.float64)
        x, y = _data(jnp.float64)
        out, _ = _train_grads(model, x, y, {"saving": {}, "plain": {"memory_saving": False}})
        (v1, g1, s1), (v2, g2, s2) = out["saving"], out["plain"]
        assert jax.tree.leaves(g1)[0].dtype == jnp.float64
        assert float(abs(v1 - v2)) <= 1e-12
        # Measured ~1e-15.
        assert float(relative_error(g1, g2)) <= 1e-9
        assert float(relative_error(s1, s2)) <= 1e-12


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_gradients_float32(block, f32_results):
    (out, _) = f32_results[block]
    (v1, g1, _), (v2, g2, _) = out["saving"], out["plain"]
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    # Measured ~4e-7 here (basic and bottleneck, BatchNorm in train mode), ~4e-7 for 2 stages
    # x 3 units and ~8e-7 for 2 stages x 9 units; BatchNorm amplifies rebuild error with depth
    # (`revjax.drift`), so the bound leaves an order of magnitude of room.
    assert float(relative_error(g1, g2)) <= 1e-5
    for leaf1, leaf2 in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert leaf1.shape == leaf2.shape and np.all(np.isfinite(leaf1))


def test_remat_transitions_same_gradients(f32_results):
    assert nnx.eval_shape(lambda: models.revnet_tiny(rngs=nnx.Rngs(0))).remat_transitions
    out, _ = f32_results["bottleneck"]
    (_, g1, s1), (_, g3, s3) = out["saving"], out["stored"]
    assert float(relative_error(g3, g1)) <= 1e-6
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s3)))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_batch_stats_updated_once(block, f32_results):
    out, old = f32_results[block]
    s_saving, s_plain = out["saving"][2], out["plain"][2]
    # Bitwise equal: the reversible backward's recomputation discards its statistics.
    for a, b in zip(jax.tree.leaves(s_saving), jax.tree.leaves(s_plain)):
        np.testing.assert_array_equal(a, b)
    # And they did move (one momentum step away from the initial ones).
    assert float(relative_error(s_saving, old)) > 1e-4


def test_stateful_step_updates_stats_once(f32_models, f32_results):
    """An `nnx.jit` / `nnx.value_and_grad` step on the module updates BatchNorm as plain mode."""
    model = nnx.clone(f32_models["basic"])
    x, y = _data(jnp.float32)

    @nnx.jit
    def step(m):
        def loss(m):
            logits = m(x, train=True)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        return nnx.value_and_grad(loss)(m)

    _, grads = step(model)
    (out, _) = f32_results["basic"]
    _, plain_grads, plain_stats = out["plain"]
    stats = nnx.state(model, nnx.BatchStat)
    # The same weights through the pure functional path with memory_saving=False.
    assert float(relative_error(stats, plain_stats)) <= 1e-6
    assert float(relative_error(nnx.state(grads, nnx.Param), plain_grads)) <= 1e-5


# --------------------------------------------------------------------------------------------
# Forward behaviour and the functional path
# --------------------------------------------------------------------------------------------


def test_eval_mode_deterministic(f32_models):
    model = nnx.clone(f32_models["bottleneck"])
    x, _ = _data(jnp.float32)
    before = nnx.state(model, nnx.BatchStat)
    forward = nnx.jit(lambda m, x: m(x, train=False))
    a, b = forward(model, x), forward(model, x)
    assert a.shape == (BATCH, 10) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    # Eval mode leaves the running averages alone.
    after = nnx.state(model, nnx.BatchStat)
    assert all(
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )


@pytest.mark.parametrize("cls", [RevNet, ResNet])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_output_shapes(cls, stem):
    model = nnx.eval_shape(
        lambda: cls((2, 2), (8, 8, 16), stem=stem, num_classes=7, rngs=nnx.Rngs(0))
    )
    graphdef, params, batch_stats = models.functional(model)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    for train in (True, False):
        logits, new_stats = jax.eval_shape(
            lambda p, s, x, train=train: models.apply(graphdef, p, s, x, train=train),
            params,
            batch_stats,
            x,
        )
        assert logits.shape == (2, 7) and logits.dtype == jnp.float32
        assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)


def test_functional_matches_module(f32_models):
    model = nnx.clone(f32_models["basic"])
    x, _ = _data(jnp.float32)
    graphdef, params, batch_stats = models.functional(model)
    logits, new_stats = jax.jit(lambda p, s, x: models.apply(graphdef, p, s, x, train=True))(
        params, batch_stats, x
    )
    expected = model(x, train=True)
    # Fixed-point carries (the default) round every F/G output to 2**-16: a last-bit difference
    # between the jitted and the eager forward now and then becomes one grid step (1.5e-5).
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert float(relative_error(new_stats, nnx.state(model, nnx.BatchStat))) <= 1e-6
    eval_logits, same_stats = models.apply(graphdef, params, batch_stats, x, train=False)
    assert eval_logits.shape == (BATCH, 10)
    assert all(
        np.array_equal(u, v)
        for u, v in zip(jax.tree.leaves(same_stats), jax.tree.leaves(batch_stats))
    )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_input_errors(f32_models):
    model = f32_models["basic"]
    with pytest.raises(ValueError, match="NHWC images of rank 4"):
        model(jnp.zeros((SIZE, SIZE, 3)), train=False)
    with pytest.raises(ValueError, match="in_channels=3 but the input has 1 channels"):
        model(jnp.zeros((2, SIZE, SIZE, 1)), train=False)
    with pytest.raises(ValueError, match="Cast to float"):
        model(jnp.zeros((2, SIZE, SIZE, 3), jnp.uint8), train=False)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 3, SIZE, SIZE), r"is channels-first \(NCHW\).*x\.transpose\(0, 2, 3, 1\)"),
        ((2, 1, SIZE, SIZE), r"looks channels-first \(NCHW\) with 1 channels.*in_channels=1\."),
    ],
)
def test_input_error_channels_first(f32_models, shape, match):
    with pytest.raises(ValueError, match=match) as info:
        f32_models["basic"](jnp.zeros(shape), train=False)
    assert f"in_channels={SIZE}" not in str(info.value)  # not the advice for NHWC data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(widths=(8, 9, 16)), "must be even"),
        (dict(widths=(8, 8)), "needs 3 entries"),
        (dict(widths=(8, 16, 8)), "may not shrink"),
        (dict(block="wide"), "unknown block"),
        (dict(stem="mnist"), "unknown stem"),
        (dict(units_per_stage=(2, 0)), "at least one stage"),
        (dict(block="bottleneck", widths=(8, 3, 6)), "divisible by 4"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: models.revnet_tiny(rngs=nnx.Rngs(0), **kwargs))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


@functools.cache
def _train_step_temp_bytes(cls, units, **kw):
    """Compiled temporary memory of loss + grad, from an abstract model (nothing allocated);
    each configuration is compiled once per run."""
    model = nnx.eval_shape(
        lambda: cls(units_per_stage=units, widths=(16, 16, 32), unroll=1, rngs=nnx.Rngs(0), **kw)
    )
    graphdef, params, batch_stats = models.functional(model)

    def step(params, batch_stats, x, y):
        def loss(p):
            logits, new_stats = models.apply(graphdef, p, batch_stats, x, train=True)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new_stats

        return jax.grad(loss, has_aux=True)(params)

    x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((4,), jnp.int32)
    # Backend optimisation level 0: LLVM code generation comes after buffer assignment, so the
    # byte counts are identical and compilation is faster (the code never runs).
    compiled = (
        jax.jit(step)
        .lower(params, batch_stats, x, y)
        .compile(compiler_options={"xla_backend_optimization_level": 0})
    )
    return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_flat_in_depth():
    # Rolled scans (unroll=1). On XLA:CPU an unrolled (straight-line) program lets the
    # scheduler run one sequence's reconstruction during the next one's forward, so the
    # saving only shows with while loops there.
    rev3 = _train_step_temp_bytes(RevNet, (3, 3))
    rev9 = _train_step_temp_bytes(RevNet, (9, 9))
    res3 = _train_step_temp_bytes(ResNet, (3, 3))
    res9 = _train_step_temp_bytes(ResNet, (9, 9))
    assert rev9 <= 1.15 * rev3, (rev3, rev9)
    assert res9 >= 2.0 * res3, (res3, res9)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_last_bn(block):
    # Same shapes as the shared tiny models: the random-init compiles are cached.
    model = _tiny(block, zero_init_last_bn=True)
    last = "bn2" if block == "basic" else "bn3"
    functions = [m for _, m in nnx.iter_graph(model) if type(m).__name__.endswith("Function")]
    assert functions
    others = ["bn1"] if block == "basic" else ["bn1", "bn2"]  # keep the usual scale of 1
    checked = 0
    for fn in functions:
        np.testing.assert_array_equal(getattr(fn, last).scale[...], 0.0)
        for name in others:
            bn = getattr(fn, name)
            if bn is not None:  # a stage's first unit has no pre-activation BatchNorm
                np.testing.assert_array_equal(bn.scale[...], 1.0)
                checked += 1
    assert checked > 0


def test_remat_transitions_cut_memory():
    """The entry units stored only their inputs: compiled temp memory drops (on every backend;
    a plain `jax.checkpoint` saved nothing on XLA:CPU). The rematerialised model (the default)
    is the one `test_temp_memory_flat_in_depth` compiles already."""
    assert nnx.eval_shape(lambda: RevNet((1,), (8, 8), rngs=nnx.Rngs(0))).remat_transitions
    remat = _train_step_temp_bytes(RevNet, (3, 3))
    stored = _train_step_temp_bytes(RevNet, (3, 3), remat_transitions=False)
    assert remat <= 0.75 * stored, (remat, stored)  # measured 3.0 vs 4.3 MiB


# --------------------------------------------------------------------------------------------
# Invertible downsampling (i-RevNet transitions)
# --------------------------------------------------------------------------------------------

# Halves grow to max(width / 2, stride**2 x previous): revnet38 16 -> 16 -> 64 -> 256,
# revnet164 16 -> 64 (zero padding) -> 256 -> 1024, with F and G at the preset's inner widths.
INVERTIBLE_PARAM_COUNTS = {"revnet38": 1_698_378, "revnet110": 5_953_194, "revnet164": 3_585_834}


@pytest.mark.parametrize("preset", sorted(INVERTIBLE_PARAM_COUNTS))
def test_invertible_param_counts(preset):
    build = getattr(models, preset)
    model = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0), downsample="invertible"))
    assert models.count_params(model) == INVERTIBLE_PARAM_COUNTS[preset]
    halves = [(s.entry.shortcut.in_features, s.entry.shortcut.out_features) for s in model.stages]
    assert halves[-1][1] == (1024 if preset == "revnet164" else 256)


def test_space_to_depth_round_trip():
    from revjax._blocks import InvertibleShortcut, depth_to_space, space_to_depth

    x = np.random.default_rng(0).normal(size=(2, 4, 6, 3)).astype(np.float32)  # no compiles
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)
    np.testing.assert_array_equal(y[0, 1, 2, :3], x[0, 2, 4])  # block (1, 2), top left
    np.testing.assert_array_equal(y[0, 1, 2, 9:], x[0, 3, 5])  # bottom right
    np.testing.assert_array_equal(depth_to_space(y, 2), x)
    shortcut = InvertibleShortcut(3, 16, stride=2)
    padded = shortcut(x)
    assert padded.shape == (2, 2, 3, 16) and not np.any(padded[..., 12:])
    np.testing.assert_array_equal(shortcut.inverse(padded), x)  # exact: no arithmetic


def test_invertible_errors():
    from revjax._blocks import InvertibleShortcut

    with pytest.raises(ValueError, match="cannot be padded to 8.*at least 16"):
        InvertibleShortcut(4, 8, stride=2)
    with pytest.raises(ValueError, match="unknown downsample"):
        nnx.eval_shape(lambda: models.revnet_tiny(rngs=nnx.Rngs(0), downsample="conv"))
    model = nnx.eval_shape(
        lambda: models.revnet_tiny(rngs=nnx.Rngs(0), downsample="invertible", **TINY)
    )
    graphdef, params, batch_stats = models.functional(model)
    x = jax.ShapeDtypeStruct((2, 7, 8, 3), jnp.float32)
    with pytest.raises(ValueError, match="divisible by 2, got 7x8"):
        jax.eval_shape(
            lambda p, s, x: models.apply(graphdef, p, s, x, train=True)[0], params, batch_stats, x
        )


def test_invertible_gradients_float64():
    # Two bottleneck stages: the first entry's halves are zero-padded (4 -> 32 channels), the
    # second's space-to-depth grows them (32 -> 128); all four units form one reversible chain,
    # which stores only its output (exact_every=None), or also the input of unit 2 inside the
    # second stage (exact_every=2), rebuilding the first stage's output from the second stage
    # either way. (The chain's segments are the stages whatever their length: one unit in the
    # first keeps the program small.)
    from revjax.reference import fill

    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = nnx.eval_shape(
            lambda: models.revnet_tiny(
                rngs=nnx.Rngs(0),
                block="bottleneck",
                param_dtype=jnp.float64,
                downsample="invertible",
                units_per_stage=(1, 3),
                widths=(8, 16, 32),
                strides=(1, 2),
            )
        )
        model = fill(model)  # the constructor's distributions drawn with NumPy: no compile
        entry = model.stages[0].entry
        assert (entry.shortcut.in_features, entry.shortcut.out_features) == (4, 32)
        assert model.stages[1].entry.shortcut.out_features == 128
        x, y = _data(jnp.float64)
        variants = {
            "flat": {"exact_every": None},
            "k2": {"exact_every": 2},
            "plain": {"memory_saving": False},
        }
        out, _ = _train_grads(model, x, y, variants)
        v2, g2, s2 = out["plain"]
        for name in ("flat", "k2"):
            v1, g1, s1 = out[name]
            assert float(abs(v1 - v2)) <= 1e-12, name
            assert float(relative_error(g1, g2)) <= 1e-10, name  # measured ~1e-16
            assert float(relative_error(s1, s2)) <= 1e-12, name
        # The entry unit is reversible: its input comes back from its output.
        h = jax.random.normal(jax.random.key(3), (BATCH, SIZE, SIZE, 4), jnp.float64)
        y1, y2 = entry(h, -h, train=False)
        b1, b2 = entry.inverse(y1, y2, train=False)
        assert float(jnp.max(jnp.abs(b1 - h))) <= 1e-12
        assert float(jnp.max(jnp.abs(b2 + h))) <= 1e-12
