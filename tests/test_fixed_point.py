"""Tests of exact (fixed-point) reversibility: ``arithmetic="fixed"``.

With int32 fixed-point carries, the backward pass rebuilds every unit's input bit for bit
(``x1 = y1 - q(F(x2))`` is integer arithmetic), whatever precision F computes in, as long as
XLA gives F the same bits in the forward and in the backward's recomputation. These tests
check the rebuilt carries against the forward's, bit for bit, and the gradients against plain
autodiff of the same rounded forward.

Shapes are tiny and each compiled function is built once per module where it can be.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rebuild_cases
from flax import nnx
from jax import lax
from rebuild_cases import nudged

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
        (y1, y2), *_ = _sequence.scan_forward(setting, fp, gp, c1, c2, keys)
        ones = jnp.ones_like(x1)
        (r1, r2), *_ = _sequence.sequence_backward(
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


# Rolled: one unit per loop iteration. Unrolled: 4 units per iteration, which XLA compiles as
# one program across unit boundaries (what a fully unrolled scan does), 16 iterations.
@pytest.mark.parametrize("unroll", [1, 4], ids=["rolled", "unrolled"])
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
    unroll = n if n <= 2 else 1  # a fully unrolled 64-unit backward compiles for minutes

    def loss(fp, gp, x1, x2, keys):
        y1, y2 = revjax.reversible_sequence(
            res, res, fp, gp, x1, x2, keys=keys, arithmetic=arithmetic,
            memory_saving=memory_saving, unroll=unroll,
        )  # fmt: skip
        w = jnp.cos(jnp.arange(y1.size, dtype=y1.dtype)).reshape(y1.shape)
        return jnp.sum(y1 * w) + jnp.sum(jnp.sin(y2))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


# One depth per code path: 2 units fully unrolled (unit 0's input rebuilt from unit 1's rebuilt
# input), DEEP units in a rolled scan. The scan code does not depend on the depth otherwise.
GRAD_DEPTHS = [2, DEEP]


@pytest.mark.parametrize("n", GRAD_DEPTHS)
def test_gradients_equal_plain_float64(n, x64):
    fp, gp, x1, x2, keys = inputs(n, jnp.float64)
    v1, g1 = _grad_fn("fixed", True, jnp.float64, n)(fp, gp, x1, x2, keys)
    v2, g2 = _grad_fn("fixed", False, jnp.float64, n)(fp, gp, x1, x2, keys)
    assert abs(float(v1 - v2)) <= 1e-12 * abs(float(v2))
    # Plain autodiff is another XLA program: where its F rounds one carry to the neighbouring
    # point of the 2**-16 grid, the gradients differ by that step's effect (0 under the suite's
    # flags; 5.1e-8 at XLA's default optimisation level, depth 2); float64 arithmetic of the
    # same forward would agree to ~1e-16.
    assert float(revjax.relative_error(g1, g2)) <= 1e-6


# Fixed point, float32 halves: the memory-saving backward differentiates its own forward
# exactly; plain autodiff is a different XLA program whose forward F may round differently in
# the last bit, which the grid turns into a one-step difference now and then. On XLA:CPU the
# two forwards agree here, so the gradients agree to float32 rounding of the backward itself.
GRAD_TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-6}


@pytest.mark.parametrize("compute", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n", GRAD_DEPTHS)
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


def test_carry_range_error_suggests_enough_fraction_bits():
    # 20000 > 2**(30 - 16) = 16384: frac_bits=14 keeps it below half of 2**16.
    message = str(revjax.CarryRangeError("x", 20000.0, 16))
    assert "frac_bits=14 widens the range 4-fold, to 65536)" in message
    assert "widens the range 2-fold, to 32768" in str(revjax.CarryRangeError("x", 16384.0, 16))
    # Beyond 2**30 no fraction bits hold it.
    assert "No frac_bits holds it" in str(revjax.CarryRangeError("x", 5e9, 16))
    assert "No frac_bits holds it" in str(revjax.CarryRangeError("x", float("inf"), 16))


def _small_sequence():
    return revjax.ReversibleSequence(
        lambda r: nnx.Linear(4, 4, rngs=r), lambda r: nnx.Linear(4, 4, rngs=r), 2,
        rngs=nnx.Rngs(0), arithmetic="fixed",
    )  # fmt: skip


def test_empty_batch():
    seq = _small_sequence()
    empty = jnp.zeros((0, 4))
    y1, y2 = seq(empty, empty)
    assert y1.shape == y2.shape == (0, 4)
    grads = nnx.grad(lambda m: jnp.sum(m(empty, empty)[0]))(seq)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_integer_halves_name_the_cast():
    x = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(TypeError, match=r"floating-point halves, got int32.*float32"):
        _small_sequence()(x, x)


# --------------------------------------------------------------------------------------------
# The invertible chain (sequences joined by space-to-depth shortcut units)
# --------------------------------------------------------------------------------------------


def _chain(n, dtype=jnp.float32, unroll=None):
    """seq(n units, C) -> entry (space-to-depth by 2, C -> 4C) -> seq(n units, 4C); the
    sequences' scans unrolled by ``unroll`` (None: the platform's default)."""
    from revjax._blocks import InvertibleShortcut

    res = lambda p, x: conv(p["w2"], jnp.tanh(conv(p["w1"], x)))

    def strided(p, x):
        h = lax.conv_general_dilated(
            x, p["w1"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return conv(p["w2"], jnp.tanh(h))

    shortcut = InvertibleShortcut(C, 4 * C, stride=2)
    segments = [
        chain_module.sequence_segment(res, res, n, unroll=unroll),
        chain_module.shortcut_unit_segment(strided, res, shortcut, shortcut.inverse),
        chain_module.sequence_segment(res, res, n, unroll=unroll),
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
    # Two XLA programs: the loss's float64 sum may differ in its last bit (XLA's default
    # optimisation level) although the output carries are equal.
    assert abs(float(v1 - v2)) <= 1e-12 * abs(float(v2))
    assert float(revjax.relative_error(g1, g2)) <= 1e-12


def test_chain_rebuild_is_bit_exact(rebuilt):
    # 2 x 32 units and the shortcut unit between them: every segment's input is rebuilt from
    # the next one's (unit 0 of the chain last). The spy sees each sequence's rebuilt input.
    # 4 units per loop iteration, as in test_sequence_rebuild_is_bit_exact's unrolled case.
    segments, params, x1, x2 = _chain(DEEP // 2, unroll=4)
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


@pytest.mark.parametrize(
    "kind, compute, halves, unroll", rebuild_cases.CASES,
    ids=[rebuild_cases.case_id(*c) for c in rebuild_cases.CASES],
)  # fmt: skip
def test_layer_rebuild_is_bit_exact(kind, compute, halves, unroll):
    # Under the suite's flags (XLA:CPU backend optimisation level 0), where rebuilding from
    # the pullback's recomputation was off by grid steps for LayerNorm + exact-GELU F/G.
    off, counted, grads, state = rebuild_cases.run_case(kind, compute, halves, unroll)
    assert (off, counted) == (0, 0.0)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert 0 < float(state["carry_peak"][...]) < revjax.carry_limit(16)


# The float32 transformer cases (where XLA's optimisation level changed the outcome of a
# pullback rebuild) and bfloat16 halves; one compile each, so a few cases only.
DEFAULT_LEVEL_CASES = [
    ("transformer", "float32", "float32", 1),
    ("transformer", "float32", "float32", rebuild_cases.UNROLLED),
    ("conv", "bfloat16", "bfloat16", 1),
]


# XLA's default debug options for these compiles only (the suite's XLA_FLAGS lower them for
# every other compile): per-compile options are applied over the flags, and with these two the
# compile's debug options equal those of a process started without XLA_FLAGS.
XLA_DEFAULT_LEVEL = {
    "xla_backend_optimization_level": 3,
    "xla_llvm_disable_expensive_passes": False,
}


@pytest.mark.parametrize(
    "case", DEFAULT_LEVEL_CASES, ids=[rebuild_cases.case_id(*c) for c in DEFAULT_LEVEL_CASES]
)
def test_layer_rebuild_is_bit_exact_at_xla_default_level(case):
    off, counted, _, _ = rebuild_cases.run_case(*case, compiler_options=XLA_DEFAULT_LEVEL)
    assert (off, counted) == (0, 0.0)


def test_layer_matches_plain_and_writes_state_once():
    def run(memory_saving):
        seq = rebuild_cases.build("conv", "float32", 1, memory_saving=memory_saving)
        return rebuild_cases.train_step(seq, *rebuild_cases.halves("conv", jnp.float32))

    v1, g1, s1 = run(True)
    v2, g2, s2 = run(False)
    assert float(v1) == float(v2)
    assert float(revjax.relative_error(g1, g2)) <= 1e-5
    # BatchNorm statistics (and the carry peak) from the forward only, as in plain mode.
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------
# The in-step rebuild check: a branch whose recomputation differs from its forward
# --------------------------------------------------------------------------------------------


class NudgedBranch(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(C, C, rngs=rngs)

    def __call__(self, x):
        return nudged(self.linear(x))


def _nudged_step(rebuild):
    seq = revjax.ReversibleSequence(
        NudgedBranch, NudgedBranch, 5, rngs=nnx.Rngs(0), arithmetic="fixed", rebuild=rebuild
    )
    x1, x2 = jnp.ones((2, C)), jnp.zeros((2, C))
    wrt = nnx.Any(nnx.Param, revjax.RebuildMismatches)
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x1, x2)[0])), argnums=nnx.DiffState(0, wrt))(seq)
    return seq, grads


def test_rebuild_mismatches_are_counted_and_warned_once(monkeypatch):
    # rebuild="pullback" rebuilds from the differentiated evaluation: every unit's F and G
    # outputs are off, and the backward counts the 5 units.
    seq, grads = _nudged_step("pullback")
    assert revjax.rebuild_mismatches(grads) == {"rebuild_mismatches": 5.0}
    assert float(revjax.record_rebuild_mismatches(seq, grads)) == 5.0
    assert revjax.rebuild_mismatches(seq) == {"rebuild_mismatches": 5.0}
    monkeypatch.setattr(revjax.layers, "_WARNED", set())
    with pytest.warns(
        revjax.RebuildMismatchWarning, match=r"rebuild_mismatches \(5 unit.*isolated"
    ):
        assert revjax.check_rebuild(seq) == {"rebuild_mismatches": 5.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revjax.check_rebuild(seq)  # once per layer


def test_isolated_rebuild_does_not_depend_on_the_pullback():
    # The default evaluates F and G for the rebuild as the forward did: exact, count 0.
    seq, grads = _nudged_step("isolated")
    assert revjax.rebuild_mismatches(grads) == {"rebuild_mismatches": 0.0}
    with pytest.raises(ValueError, match="unknown rebuild"):
        revjax.ReversibleSequence(
            NudgedBranch, NudgedBranch, 2, rngs=nnx.Rngs(0), arithmetic="fixed", rebuild="x"
        )


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
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------
# Training: an overflowed carry; a bfloat16 RevViT (digits with fixed point, the default:
# tests/test_train.py::test_digits_reaches_95_percent)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_names_an_overflowed_carry(tmp_path):
    import dataclasses

    from helpers import TINY

    from revjax import train

    # 29 fraction bits: carries must stay below 2; a RevNet's activations do not.
    cfg = dataclasses.replace(TINY, arithmetic="fixed", frac_bits=29, num_steps=2)
    with pytest.raises(revjax.CarryRangeError, match=r"stages/\d/reversible/carry_peak"):
        train.train_and_evaluate(cfg, tmp_path)


@pytest.mark.slow  # 120 training steps; the core set checks the bf16 fixed-point gradients
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
    # Set globally: the trainer compiles in a helper thread, which a thread-local
    # `jax.numpy_dtype_promotion` context would not reach.
    before = jax.config.jax_numpy_dtype_promotion
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    try:
        _, result = train.train_and_evaluate(cfg, tmp_path)
    finally:
        jax.config.update("jax_numpy_dtype_promotion", before)
    assert result["eval_accuracy"] >= 0.5, result
