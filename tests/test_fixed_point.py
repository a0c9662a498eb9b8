"""Tests of exact (fixed-point) reversibility: ``arithmetic="fixed"``.

With int32 fixed-point carries, the backward pass rebuilds every unit's input bit for bit
(``x1 = y1 - q(F(x2))`` is integer arithmetic), whatever precision F computes in, as long as
XLA gives F the same bits in the forward and in the backward's recomputation. These tests
check the rebuilt carries against the forward's, bit for bit, and the gradients against plain
autodiff of the same rounded forward.

Shapes are tiny and each compiled function is built once per module where it can be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import revjax
from revjax import _carry, _coupling, _sequence, _units
from revjax import _chain as chain_module
from revjax._carry import quantize

DEEP = 64  # units of the exactness tests
B, HW, C = 2, 4, 4  # halves [2, 4, 4, 4]


# --------------------------------------------------------------------------------------------
# Pure residual functions: conv -> batch-statistics normalisation -> ReLU -> dropout -> conv
# --------------------------------------------------------------------------------------------


def conv(w, x):
    return lax.conv_general_dilated(
        x, w.astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def make_residual(compute_dtype, dropout=0.25):
    """F/G in ``compute_dtype``; BatchNorm in train mode (batch statistics), written as Flax
    does (multiplication by rsqrt), then dropout drawn from the unit's key."""

    def residual(p, x, key):
        h = conv(p["w1"], x.astype(compute_dtype)).astype(jnp.float32)  # [B, H, W, C]
        mean = jnp.mean(h, (0, 1, 2), keepdims=True)
        d = h - mean
        h = d * lax.rsqrt(jnp.mean(d * d, (0, 1, 2), keepdims=True) + 1e-3)
        h = jax.nn.relu(h).astype(compute_dtype)
        keep = jax.random.bernoulli(key, 1 - dropout, h.shape)
        h = jnp.where(keep, h / (1 - dropout), 0)
        return conv(p["w2"], h)

    return residual


def stacked_params(key, n, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {
        "w1": 0.3 * jax.random.normal(k1, (n, 3, 3, C, C), dtype),
        "w2": 0.3 * jax.random.normal(k2, (n, 3, 3, C, C), dtype),
    }


def inputs(n, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 5)
    fp, gp = stacked_params(ks[0], n, dtype), stacked_params(ks[1], n, dtype)
    x1 = jax.random.normal(ks[2], (B, HW, HW, C), dtype)
    x2 = jax.random.normal(ks[3], (B, HW, HW, C), dtype)
    keys = jax.random.split(ks[4], n)
    return fp, gp, x1, x2, keys


# --------------------------------------------------------------------------------------------
# reversible_sequence: the rebuilt carries equal the forward's, bit for bit
# --------------------------------------------------------------------------------------------


def rebuild_mismatches(arithmetic, compute_dtype, unroll, n=DEEP):
    """Forward scan, then the memory-saving backward's rebuild (`jax.vjp` primal outputs), in
    one jit as the custom VJP runs them; returns the mismatched elements of unit 0's input and
    the largest error of its value."""
    fp, gp, x1, x2, keys = inputs(n)
    res = make_residual(compute_dtype)
    branch = _units.Branch(res, False, True)
    arith = _carry.make_carry(arithmetic, 16, x1.dtype)
    setting = _sequence.SequenceSetting(_coupling.additive_coupling, branch, branch, unroll, arith)

    @jax.jit
    def run(fp, gp, x1, x2, keys):
        c1, c2 = arith.enter(x1), arith.enter(x2)
        (y1, y2), _, _, _ = _sequence.scan_forward(setting, fp, gp, c1, c2, keys)
        ones = jnp.ones_like(x1)
        (r1, r2), _, _ = _sequence.sequence_backward(
            setting, fp, gp, y1, y2, keys, None, None, ones, ones
        )
        count = jnp.sum(r1 != c1) + jnp.sum(r2 != c2)
        err = jnp.maximum(
            jnp.max(jnp.abs(arith.view(r1) - arith.view(c1))),
            jnp.max(jnp.abs(arith.view(r2) - arith.view(c2))),
        )
        return count, err

    count, err = run(fp, gp, x1, x2, keys)
    return int(count), float(err)


@pytest.mark.parametrize("unroll", [1, DEEP], ids=["rolled", "unrolled"])
@pytest.mark.parametrize("compute", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sequence_rebuild_is_bit_exact(compute, unroll):
    count, err = rebuild_mismatches("fixed", compute, unroll)
    assert (count, err) == (0, 0.0)


def test_float_arithmetic_rebuild_is_not_exact():
    # The contrast: the same units with float carries rebuild unit 0 with rounding error.
    count, err = rebuild_mismatches("float", jnp.bfloat16, 1)
    assert count > 0 and err > 1e-3


# --------------------------------------------------------------------------------------------
# Gradients: memory-saving vs plain autodiff of the same rounded forward
# --------------------------------------------------------------------------------------------


def _grad_fn(arithmetic, memory_saving, compute, n):
    res = make_residual(compute)
    unroll = n if n <= 8 else 1  # a fully unrolled 64-unit backward compiles for minutes

    def loss(fp, gp, x1, x2, keys):
        y1, y2 = revjax.reversible_sequence(
            res, res, fp, gp, x1, x2, keys=keys, arithmetic=arithmetic,
            memory_saving=memory_saving, unroll=unroll,
        )  # fmt: skip
        w = jnp.cos(jnp.arange(y1.size, dtype=y1.dtype)).reshape(y1.shape)
        return jnp.sum(y1 * w) + jnp.sum(jnp.sin(y2))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("n", [2, 8, DEEP])
def test_gradients_equal_plain_float64(n, x64):
    fp, gp, x1, x2, keys = inputs(n, jnp.float64)
    v1, g1 = _grad_fn("fixed", True, jnp.float64, n)(fp, gp, x1, x2, keys)
    v2, g2 = _grad_fn("fixed", False, jnp.float64, n)(fp, gp, x1, x2, keys)
    assert abs(float(v1 - v2)) <= 1e-12 * abs(float(v2))
    assert float(revjax.relative_error(g1, g2)) <= 1e-12


# Fixed point, float32 halves: the memory-saving backward differentiates its own forward
# exactly; plain autodiff is a different XLA program whose forward F may round differently in
# the last bit, which the grid turns into a one-step difference now and then. On XLA:CPU the
# two forwards agree here, so the gradients agree to float32 rounding of the backward itself.
GRAD_TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-6}


@pytest.mark.parametrize("compute", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n", [2, 8, DEEP])
def test_gradients_match_plain_at_every_depth(n, compute):
    fp, gp, x1, x2, keys = inputs(n)
    v1, g1 = _grad_fn("fixed", True, compute, n)(fp, gp, x1, x2, keys)
    v2, g2 = _grad_fn("fixed", False, compute, n)(fp, gp, x1, x2, keys)
    assert float(v1) == float(v2)  # the same rounded forward
    assert float(revjax.relative_error(g1, g2)) <= GRAD_TOL[compute]


# --------------------------------------------------------------------------------------------
# Range and refusals
# --------------------------------------------------------------------------------------------


def test_out_of_range_gives_nan_and_peak():
    fp, gp, x1, x2, keys = inputs(2)
    res = make_residual(jnp.float32)
    limit = revjax.carry_limit(16)
    (y1, y2), peak = revjax.reversible_sequence(
        res, res, fp, gp, x1 * (2 * limit), x2, keys=keys, arithmetic="fixed", return_peak=True
    )
    assert float(peak) >= limit
    assert bool(jnp.all(jnp.isnan(y1))) and bool(jnp.all(jnp.isnan(y2)))
    (y1, _), peak = revjax.reversible_sequence(
        res, res, fp, gp, x1, x2, keys=keys, arithmetic="fixed", return_peak=True
    )
    assert 0 < float(peak) < limit and bool(jnp.all(jnp.isfinite(y1)))


def test_nan_input_is_not_hidden_by_the_integers():
    fp, gp, x1, x2, keys = inputs(2)
    res = make_residual(jnp.float32)
    y1, y2 = revjax.reversible_sequence(
        res, res, fp, gp, x1.at[0, 0, 0, 0].set(jnp.nan), x2, keys=keys, arithmetic="fixed"
    )
    assert bool(jnp.all(jnp.isnan(y1)))


def test_affine_and_bad_options_refused():
    fp, gp, x1, x2, _ = inputs(2)
    pair = lambda p, x: (conv(p["w1"], x), conv(p["w2"], x))
    with pytest.raises(ValueError, match="additive coupling"):
        revjax.reversible_sequence(pair, pair, fp, gp, x1, x2, coupling="affine",
                                   arithmetic="fixed")  # fmt: skip
    with pytest.raises(ValueError, match="unknown arithmetic"):
        revjax.reversible_sequence(pair, pair, fp, gp, x1, x2, arithmetic="int")
    with pytest.raises(ValueError, match="frac_bits"):
        revjax.reversible_sequence(pair, pair, fp, gp, x1, x2, arithmetic="fixed", frac_bits=31)
    with pytest.raises(ValueError, match="additive coupling"):
        revjax.ReversibleSequence(
            lambda r: nnx.Linear(2, 2, rngs=r), lambda r: nnx.Linear(2, 2, rngs=r), 2,
            rngs=nnx.Rngs(0), coupling="affine", arithmetic="fixed",
        )  # fmt: skip


def test_carry_range_error_names_the_module():
    seq = revjax.ReversibleSequence(
        lambda r: nnx.Linear(4, 4, rngs=r), lambda r: nnx.Linear(4, 4, rngs=r), 2,
        rngs=nnx.Rngs(0), arithmetic="fixed", frac_bits=24,
    )  # fmt: skip
    x = jnp.ones((2, 4))
    seq(x, x)
    revjax.check_carry_range(seq)  # in range: |values| ~ 1 < 64
    y1, _ = seq(200 * x, x)  # beyond 2**(30 - 24) = 64
    assert bool(jnp.all(jnp.isnan(y1)))
    with pytest.raises(revjax.CarryRangeError, match=r"frac_bits=24.*fewer fraction bits"):
        revjax.check_carry_range(seq)
    _, _, stats = nnx.split(seq, nnx.Param, ...)
    with pytest.raises(revjax.CarryRangeError, match="carry_peak") as info:
        revjax.check_carry_range(stats)
    assert info.value.peak >= 200 and info.value.frac_bits == 24


# --------------------------------------------------------------------------------------------
# The invertible chain (sequences joined by space-to-depth shortcut units)
# --------------------------------------------------------------------------------------------


def _chain(n, dtype=jnp.float32):
    """seq(n units, C) -> entry (space-to-depth by 2, C -> 4C) -> seq(n units, 4C)."""
    from revjax._blocks import InvertibleShortcut

    res = lambda p, x: conv(p["w2"], jnp.tanh(conv(p["w1"], x)))

    def strided(p, x):
        h = lax.conv_general_dilated(
            x, p["w1"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return conv(p["w2"], jnp.tanh(h))

    shortcut = InvertibleShortcut(C, 4 * C, stride=2)
    segments = [
        chain_module.sequence_segment(res, res, n),
        chain_module.shortcut_unit_segment(strided, res, shortcut, shortcut.inverse),
        chain_module.sequence_segment(res, res, n),
    ]
    ks = jax.random.split(jax.random.key(1), 6)
    w = lambda k, lead, cin, cout: 0.3 * jax.random.normal(k, (*lead, 3, 3, cin, cout), dtype)
    params = [
        ({"w1": w(ks[0], (n,), C, C), "w2": w(ks[0], (n,), C, C)},
         {"w1": w(ks[1], (n,), C, C), "w2": w(ks[1], (n,), C, C)}),
        ({"w1": w(ks[2], (), C, 4 * C), "w2": w(ks[2], (), 4 * C, 4 * C)},
         {"w1": w(ks[3], (), 4 * C, 4 * C), "w2": w(ks[3], (), 4 * C, 4 * C)}),
        ({"w1": w(ks[4], (n,), 4 * C, 4 * C), "w2": w(ks[4], (n,), 4 * C, 4 * C)},
         {"w1": w(ks[5], (n,), 4 * C, 4 * C), "w2": w(ks[5], (n,), 4 * C, 4 * C)}),
    ]  # fmt: skip
    _, _, x1, x2, _ = inputs(1, dtype)
    return segments, params, x1, x2


def _chain_grad(segments, **kw):
    def loss(params, x1, x2):
        (y1, y2), _ = revjax.reversible_chain(segments, params, x1, x2, arithmetic="fixed", **kw)
        return jnp.sum(y1 * jnp.cos(y2))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def test_chain_gradients_equal_plain_float64(x64):
    segments, params, x1, x2 = _chain(3, jnp.float64)
    v1, g1 = _chain_grad(segments)(params, x1, x2)
    v2, g2 = _chain_grad(segments, memory_saving=False)(params, x1, x2)
    assert float(v1) == float(v2)
    assert float(revjax.relative_error(g1, g2)) <= 1e-12


def test_chain_rebuild_is_bit_exact(rebuilt):
    # 2 x 32 units and the shortcut unit between them: every segment's input is rebuilt from
    # the next one's (unit 0 of the chain last). The spy sees each sequence's rebuilt input.
    segments, params, x1, x2 = _chain(DEEP // 2)
    _chain_grad(segments)(params, x1, x2)
    assert len(rebuilt) == 2  # the two sequences, the first one's = the chain's input
    r1, r2 = rebuilt[-1]
    assert np.array_equal(r1, quantize(x1, 16)) and np.array_equal(r2, quantize(x2, 16))


@pytest.fixture
def rebuilt(monkeypatch):
    """Records the input carries every memory-saving sequence backward rebuilds."""
    got = []
    original = _sequence.sequence_backward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        record = lambda a, b: got.append((np.asarray(a), np.asarray(b)))
        jax.debug.callback(record, *out[0])
        return out

    # The sequences call it from their module, the chain's sequence segments from theirs.
    monkeypatch.setattr(_sequence, "sequence_backward", spy)
    monkeypatch.setattr(chain_module, "sequence_backward", spy)
    yield got
    jax.effects_barrier()


# --------------------------------------------------------------------------------------------
# ReversibleSequence: conv and transformer F/G, BatchNorm in train mode, dropout
# --------------------------------------------------------------------------------------------


class ConvBranch(nnx.Module):
    """conv -> BatchNorm (batch statistics in training) -> ReLU -> dropout -> conv."""

    def __init__(self, compute, rngs):
        kw = dict(dtype=compute, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = nnx.Conv(C, C, (3, 3), use_bias=False, **kw)
        self.bn = nnx.BatchNorm(C, use_fast_variance=False, epsilon=1e-3, **kw)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.conv2 = nnx.Conv(C, C, (3, 3), use_bias=False, **kw)

    def __call__(self, x, *, train):
        h = jax.nn.relu(self.bn(self.conv1(x), use_running_average=not train))
        return self.conv2(self.drop(h, deterministic=not train))


class AttentionBranch(nnx.Module):
    """LayerNorm -> multi-head self-attention with attention dropout."""

    def __init__(self, compute, rngs):
        kw = dict(dtype=compute, param_dtype=jnp.float32, rngs=rngs)
        self.norm = nnx.LayerNorm(C, **kw)
        self.attn = nnx.MultiHeadAttention(2, C, dropout_rate=0.25, decode=False, **kw)

    def __call__(self, x, *, train):
        return self.attn(self.norm(x), deterministic=not train)


class MlpBranch(nnx.Module):
    """LayerNorm -> MLP (exact GELU) with dropout."""

    def __init__(self, compute, rngs):
        kw = dict(dtype=compute, param_dtype=jnp.float32, rngs=rngs)
        self.norm = nnx.LayerNorm(C, **kw)
        self.up = nnx.Linear(C, 2 * C, **kw)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.down = nnx.Linear(2 * C, C, **kw)

    def __call__(self, x, *, train):
        h = jax.nn.gelu(self.up(self.norm(x)), approximate=False)
        return self.down(self.drop(h, deterministic=not train))


def _layer_run(kind, compute, unroll, memory_saving=True):
    """A fixed-point ReversibleSequence, rolled (``unroll=1``) of DEEP units, else of ``unroll``
    units fully unrolled: loss, gradients, new state."""
    n = DEEP if unroll == 1 else unroll
    make_f, make_g = (ConvBranch, ConvBranch) if kind == "conv" else (AttentionBranch, MlpBranch)
    seq = revjax.ReversibleSequence(
        lambda r: make_f(compute, r), lambda r: make_g(compute, r), n,
        rngs=nnx.Rngs(0, dropout=1), arithmetic="fixed", unroll=unroll,
        memory_saving=memory_saving,
    )  # fmt: skip
    graphdef, params, rest = nnx.split(seq, nnx.Param, ...)
    shape = (B, HW, HW, C) if kind == "conv" else (B, HW * HW, C)
    x1 = jax.random.normal(jax.random.key(2), shape)
    x2 = jax.random.normal(jax.random.key(3), shape)

    @jax.jit
    def step(params, rest, x1, x2):
        def loss(params, x1, x2):
            m = nnx.merge(graphdef, params, rest, copy=True)
            y1, y2 = m(x1, x2, train=True)
            w = jnp.cos(jnp.arange(y1.size, dtype=jnp.float32)).reshape(y1.shape)
            return jnp.sum(y1 * w) + jnp.sum(jnp.sin(y2)), nnx.state(m, nnx.Not(nnx.Param))

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x1, x2)

    # Flax's layers promote bfloat16 with float32 inside, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard" if compute == jnp.bfloat16 else "strict"):
        (value, new_state), grads = step(params, rest, x1, x2)
    return x1, x2, value, grads, new_state


# A fully unrolled scan of NNX F/G compiles for minutes at 64 units on XLA:CPU: 16 there.
UNROLLED = 16
LAYER_CASES = [
    ("conv", jnp.float32, 1),
    ("conv", jnp.bfloat16, 1),
    ("conv", jnp.float32, UNROLLED),
    ("transformer", jnp.float32, 1),
    ("transformer", jnp.bfloat16, 1),
    ("transformer", jnp.bfloat16, UNROLLED),
]


LAYER_IDS = [
    f"{k}-{jnp.dtype(c).name}-{'unrolled' if u > 1 else 'rolled'}" for k, c, u in LAYER_CASES
]


@pytest.mark.parametrize("kind, compute, unroll", LAYER_CASES, ids=LAYER_IDS)
def test_layer_rebuild_is_bit_exact(kind, compute, unroll, rebuilt):
    x1, x2, _, grads, state = _layer_run(kind, compute, unroll)
    jax.effects_barrier()
    ((r1, r2),) = rebuilt
    assert np.array_equal(r1, quantize(x1, 16)) and np.array_equal(r2, quantize(x2, 16))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    peak = float(state["carry_peak"][...])
    assert 0 < peak < revjax.carry_limit(16)


def test_transformer_float32_unrolled_mismatches_do_not_cascade(rebuilt):
    # XLA may compute LayerNorm + attention differently in the forward and in the backward's
    # recomputation when everything is unrolled into one program: a rebuilt element is then one
    # grid step off. Count them: a handful at most, each one step, not a cascade.
    x1, x2, _, _, _ = _layer_run("transformer", jnp.float32, UNROLLED)
    jax.effects_barrier()
    ((r1, r2),) = rebuilt
    diff = np.concatenate([(r1 - quantize(x1, 16)).ravel(), (r2 - quantize(x2, 16)).ravel()])
    assert np.count_nonzero(diff) <= diff.size // 100
    assert np.max(np.abs(diff)) <= 4  # grid steps


def test_layer_matches_plain_and_writes_state_once():
    _, _, v1, g1, s1 = _layer_run("conv", jnp.float32, 1)
    _, _, v2, g2, s2 = _layer_run("conv", jnp.float32, 1, memory_saving=False)
    assert float(v1) == float(v2)
    assert float(revjax.relative_error(g1, g2)) <= 1e-5
    # BatchNorm statistics (and the carry peak) from the forward only, as in plain mode.
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------
# Models: RevNet (both downsampling modes), RevViT; drift reports exactness
# --------------------------------------------------------------------------------------------


def _model_grads(model, x, labels):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest):
        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            logits = m(x, train=True)
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
            return ce, nnx.state(m, nnx.Not(nnx.Param))

        return jax.value_and_grad(loss, has_aux=True)(params)

    return step(params, rest)


@pytest.mark.parametrize("downsample", ["pool", "invertible"])
def test_revnet_fixed_matches_plain_and_rebuilds_exactly(downsample):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    labels = jnp.arange(4) % 10
    make = lambda **kw: revjax.revnet_tiny(
        in_channels=1, downsample=downsample, arithmetic="fixed", exact_every=None,
        rngs=nnx.Rngs(0), **kw,
    )  # fmt: skip
    model = make()
    (v1, s1), g1 = _model_grads(model, x, labels)
    (v2, s2), g2 = _model_grads(make(memory_saving=False), x, labels)
    assert float(v1) == float(v2)
    assert float(revjax.relative_error(g1, g2)) <= 1e-5
    peaks = [a for a in jax.tree.leaves(nnx.state(model, revjax.CarryPeak))]
    assert peaks  # one per fixed-point sequence (and invertible entry unit)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    errors = revjax.reconstruction_error(model, None, None, x)
    assert errors and all(e["mismatches"] == 0 and e["max_abs"] == 0.0 for e in errors.values())


def test_float_revnet_drift_reports_mismatches():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    model = revjax.revnet_tiny(in_channels=1, arithmetic="float", rngs=nnx.Rngs(0))
    errors = revjax.reconstruction_error(model, None, None, x)
    assert sum(e["mismatches"] for e in errors.values()) > 0


def test_revvit_bfloat16_fixed_gradients():
    model = revjax.revvit_tiny(
        in_channels=1, dtype=jnp.bfloat16, carry_dtype=jnp.float32, arithmetic="fixed",
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    # Flax's LayerNorm promotes bfloat16 with float32 inside, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        (value, _), grads = _model_grads(model, x, jnp.arange(4))
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------
# Training: an overflowed carry; a bfloat16 RevViT (digits with fixed point, the default:
# tests/test_train.py::test_digits_reaches_95_percent)
# --------------------------------------------------------------------------------------------


def test_trainer_names_an_overflowed_carry(tmp_path):
    import dataclasses

    from helpers import TINY

    from revjax import train

    # 29 fraction bits: carries must stay below 2; a RevNet's activations do not.
    cfg = dataclasses.replace(TINY, arithmetic="fixed", frac_bits=29, num_steps=2)
    with pytest.raises(revjax.CarryRangeError, match=r"stages/\d/reversible/carry_peak"):
        train.train_and_evaluate(cfg, tmp_path)


def test_revvit_bfloat16_fixed_point_trains_on_digits(tmp_path):
    import dataclasses

    from helpers import TINY

    from revjax import train

    cfg = dataclasses.replace(
        TINY,
        model="revvit_tiny",
        compute_dtype="bfloat16",
        arithmetic="fixed",
        optimizer="adamw",
        learning_rate=3e-3,
        weight_decay=0.05,
        lr_schedule="cosine",
        warmup_steps=10,
        batch_size=64,
        num_steps=120,
        log_every=40,
    )
    # Flax's LayerNorm promotes bfloat16 with float32 inside, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        result = train.train_and_evaluate(cfg, tmp_path)
    assert result["eval_accuracy"] >= 0.5, result
