"""Numerical drift (`revjax.drift`): reconstruction error, gradient accuracy against float64,
``exact_every``, ``carry_dtype``, the training monitor and the drift benchmark's quick mode.

Models get their weights from `revjax.reference.fill` (the constructor's distributions
drawn with NumPy): a random init of a new shape costs an XLA compile on the CPU. Scans are
rolled (``unroll=1``) where gradients of deep models are compiled: XLA:CPU compiles a fully
unrolled 18-unit backward for minutes.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import ROOT, one_device_env

from experiments import bench_drift
from revjax import models, reference, relative_error
from revjax.drift import DriftMonitor, DriftWarning, gradient_agreement, reconstruction_error

# Float arithmetic: what drifts (fixed-point models rebuild exactly: tests/test_fixed_point.py).
TINY = dict(units_per_stage=(4, 4), widths=(8, 8, 16), unroll=1, arithmetic="float")


def _abstract(**kw):
    return nnx.eval_shape(lambda: models.RevNet(rngs=nnx.Rngs(0), **kw))


def _model(seed=0, **kw):
    return reference.fill(_abstract(**kw), seed)


def _images(shape, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.fixture(scope="module")
def tiny():
    return _model(**TINY)


def _float64(graphdef_kw, params, batch_stats):
    """Graphdef and state of the same weights in float64 (call with x64 enabled)."""
    graphdef, _, _ = models.functional(_abstract(param_dtype=jnp.float64, **graphdef_kw))
    return (
        graphdef,
        reference.cast(params, jnp.float64),
        reference.cast(batch_stats, jnp.float64),
    )


# --------------------------------------------------------------------------------------------
# Reconstruction error and the monitor
# --------------------------------------------------------------------------------------------


def test_reconstruction_error_report(tiny):
    x = _images((4, 8, 8, 3))
    report = reconstruction_error(tiny, None, None, x)
    # Both stages have 3 reversible units (the entry unit stores its input).
    assert sorted(report) == ["stage0", "stage1"]
    for stats in report.values():
        keys = {"max_abs", "max_rel", "rel", "channel_rel", "mismatches"}
        assert set(stats) == keys | {"per_unit"}
        assert set(stats["per_unit"]) == keys | {"scale"}
        assert stats["mismatches"] > 0  # float arithmetic: rebuilt bits differ
        for values in stats["per_unit"].values():
            assert values.shape == (3,)
        # Measured ~3e-7 in float32.
        assert 0 < stats["max_rel"] < 1e-5 and stats["rel"] < 1e-5
        assert stats["max_rel"] == stats["per_unit"]["max_rel"].max()
    # The same from the functional split.
    graphdef, params, batch_stats = models.functional(tiny)
    again = reconstruction_error(graphdef, params, batch_stats, x)
    assert again["stage1"]["max_abs"] == report["stage1"]["max_abs"]
    # The images as the second positional argument of a module's call.
    assert reconstruction_error(tiny, x)["stage1"]["max_abs"] == report["stage1"]["max_abs"]
    with pytest.raises(TypeError, match=r"needs the images x: reconstruction_error\(model, x\)"):
        reconstruction_error(graphdef, params, batch_stats)


def test_reconstruction_error_float64_tiny(tiny):
    _, params, batch_stats = models.functional(tiny)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        graphdef, p64, s64 = _float64(TINY, params, batch_stats)
        report = reconstruction_error(graphdef, p64, s64, _images((4, 8, 8, 3), dtype=jnp.float64))
    for stats in report.values():
        assert stats["max_rel"] < 1e-13 and stats["channel_rel"] < 1e-12  # measured ~1e-15


def test_exact_every_resets_reconstruction(tiny):
    graphdef, params, batch_stats = models.functional(tiny)
    exact, _, _ = models.functional(_abstract(exact_every=2, **TINY))
    report = reconstruction_error(exact, params, batch_stats, _images((4, 8, 8, 3)))
    for stats in report.values():
        # 3 reversible units, k=2: unit 1 (= 3 - 2) uses its stored input; unit 2 is rebuilt
        # from the stage output and unit 0 from unit 1's exact input (chains of <= 2 units).
        assert stats["per_unit"]["max_abs"][1] == 0.0
        assert stats["per_unit"]["max_abs"][0] > 0 and stats["per_unit"]["max_abs"][2] > 0


def test_monitor_float64_near_zero(tiny):
    _, params, batch_stats = models.functional(tiny)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        graphdef, p64, s64 = _float64(TINY, params, batch_stats)
        monitor = DriftMonitor(graphdef, threshold=1e-3)
        # No warning: pyproject turns warnings into errors.
        metrics = monitor.check(p64, s64, _images((4, 8, 8, 3), dtype=jnp.float64))
    stats = ("max_abs", "max_rel", "rel", "channel_rel", "mismatches")
    totals = {"max_rel", "mismatches"}
    assert set(metrics) == {f"stage{s}/{k}" for s in (0, 1) for k in stats} | totals
    assert metrics["max_rel"] < 1e-13  # measured ~1e-15


def test_monitor_warns_on_corrupted_stage(tiny):
    graphdef, params, batch_stats = models.functional(tiny)
    monitor = DriftMonitor(graphdef, threshold=1e-3)
    x = _images((4, 8, 8, 3))
    assert monitor.check(params, batch_stats, x)["max_rel"] < 1e-5
    # Corrupt stage 1: the G of its reversible unit 1 outputs 1e6 times too much (exploding
    # weights), so rebuilding that unit's x2 = y2 - G(y1) loses x2 to cancellation.
    corrupted = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a.at[1].multiply(1e6)
            if "['stages'][1]['reversible']['g']['conv2']" in jax.tree_util.keystr(path)
            else a
        ),
        params,
    )
    with pytest.warns(DriftWarning, match="stage1.*above the drift threshold"):
        bad = monitor.check(corrupted, batch_stats, x)
    assert bad["stage1/max_rel"] > 1e-3 and bad["stage0/max_rel"] < 1e-5


def test_monitor_rejects_bad_threshold(tiny):
    with pytest.raises(ValueError, match="positive"):
        DriftMonitor(models.functional(tiny)[0], threshold=0)


# --------------------------------------------------------------------------------------------
# Gradient agreement
# --------------------------------------------------------------------------------------------


def test_gradient_agreement():
    ref = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([1e-9, 0.0])}
    same = gradient_agreement(ref, ref)
    assert same["rel"] == 0 and same["cos"] == pytest.approx(1.0) and same["max_leaf_rel"] == 0
    other = {"a": jnp.asarray([3.0, 4.5]), "b": jnp.asarray([1.0, 0.0])}
    out = gradient_agreement(other, ref)
    assert out["leaves"]["['a']"]["rel"] == pytest.approx(0.1)
    # b's reference norm is negligible next to a's: not counted in max_leaf_rel.
    assert not out["leaves"]["['b']"]["significant"]
    assert out["max_leaf_rel"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="different structures"):
        gradient_agreement({"a": ref["a"]}, ref)
    # A vector whose float64 cosine with itself rounds above 1: clipped to 1.
    v = np.asarray([0.9470809631292422, -0.7037352358069926, -1.2654214710460525,
                    -0.6232744625373522, 0.0413259793472436, -2.3250307746388343,
                    -0.21879166393254573])
    assert np.vdot(v, v) / np.linalg.norm(v) ** 2 > 1
    clipped = gradient_agreement({"v": v}, {"v": v})
    assert clipped["cos"] == 1.0 and clipped["leaves"]["['v']"]["cos"] == 1.0


# --------------------------------------------------------------------------------------------
# Gradient accuracy against float64
# --------------------------------------------------------------------------------------------


def _three_gradients(model, x, y):
    """Reversible float32, plain float32 and plain float64 gradients of the same weights."""
    graphdef, params, batch_stats = models.functional(model)
    plain = reference.variant(model, memory_saving=False)

    def grad(graphdef, p, s, x):
        def loss(p):
            logits, _ = models.apply(graphdef, p, s, x, train=True)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        return jax.grad(loss)(p)

    # float32 outside x64: under x64, Flax's pooling counts would silently become float64.
    rev32, plain32 = jax.jit(lambda p, s, x: (grad(graphdef, p, s, x), grad(plain, p, s, x)))(
        params, batch_stats, x
    )
    f64 = reference.float64_gradients(model, params, batch_stats, x, y)
    return jax.device_get(rev32), jax.device_get(plain32), f64


def _assert_within_twice_plain(model, x, y):
    rev, plain, f64 = _three_gradients(model, x, y)
    rev64, plain64 = gradient_agreement(rev, f64), gradient_agreement(plain, f64)
    checked = 0
    for name, leaf in rev64["leaves"].items():
        if leaf["significant"]:
            checked += 1
            assert leaf["rel"] <= 2 * plain64["leaves"][name]["rel"], (
                name,
                leaf["rel"],
                plain64["leaves"][name]["rel"],
            )
    assert checked > 10
    return rev64, plain64


def test_18_units_float32_as_accurate_as_plain():
    # One stage of 18 units (17 reversible), BatchNorm in train mode, batch 16. 16 channels
    # (halves of 8): the rolled scan's convolution gradients run slowly on XLA:CPU, and the
    # comparison with plain does not depend on the width (at 32 channels the same margins).
    model = _model(units_per_stage=(18,), widths=(16, 16), unroll=1)
    x, y = _images((16, 8, 8, 3), seed=2), jnp.arange(16) % 10
    rev64, plain64 = _assert_within_twice_plain(model, x, y)
    assert rev64["cos"] > 0.9999


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "batch"), [("revnet110", 2), ("revnet164", 4)])
def test_presets_float32_as_accurate_as_plain(preset, batch):
    # The presets' depth is the point: 8x8 inputs (8, 4 and 2 pixels a side through the three
    # stages) and small batches keep the CPU run short (float64 included; the rolled scans'
    # conv gradients run slowly on XLA:CPU); at 16x16 the same margins, at 1.5x the CPU time.
    model = reference.fill(
        nnx.eval_shape(lambda: getattr(models, preset)(rngs=nnx.Rngs(0), unroll=1))
    )
    x, y = _images((batch, 8, 8, 3), seed=3), jnp.arange(batch) % 10
    _assert_within_twice_plain(model, x, y)


# --------------------------------------------------------------------------------------------
# exact_every and carry_dtype through RevNet
# --------------------------------------------------------------------------------------------


def _grads(graphdef, params, batch_stats, x, y):
    return jax.device_get(reference.gradients(graphdef, params, batch_stats, x, y))


def test_exact_every_one_equals_plain(tiny):
    _, params, batch_stats = models.functional(tiny)
    x, y = _images((4, 8, 8, 3)), jnp.arange(4)
    every1 = reference.variant(tiny, exact_every=1)
    plain = reference.variant(tiny, memory_saving=False)
    g1, gp = _grads(every1, params, batch_stats, x, y), _grads(plain, params, batch_stats, x, y)
    # Every unit's input is the stored one: the plain computation up to operation order.
    assert float(jax.jit(relative_error)(g1, gp)) <= 1e-6  # one compile, not one per leaf


def test_exact_every_memory_grows_with_depth_over_k():
    def temp(units, k):
        model = _abstract(units_per_stage=(units,), widths=(16, 16), unroll=1)
        return reference.gradient_temp_bytes(model, 16, 8, exact_every=k)

    # 4 -> 12 reversible units: +8 stored inputs with k=1 (3 -> 11), +2 with k=4 (0 -> 2).
    grow1 = temp(13, 1) - temp(5, 1)
    grow4 = temp(13, 4) - temp(5, 4)
    activation = 16 * 8 * 8 * 16 * 4  # one unit's input, both halves, float32 (batch 16)
    assert grow1 >= 6 * activation, (grow1, activation)
    assert 0 < grow4 <= 0.4 * grow1, (grow1, grow4)


def test_carry_dtype_keeps_float32_reconstruction(tiny):
    graphdef, params, batch_stats = models.functional(tiny)
    x = _images((4, 8, 8, 3))
    with jax.numpy_dtype_promotion("standard"):
        f32_carry = reference.variant(tiny, dtype=jnp.bfloat16, carry_dtype=jnp.float32)
        bf16_carry = reference.variant(tiny, dtype=jnp.bfloat16)
        good = reconstruction_error(f32_carry, params, batch_stats, x)
        bad = reconstruction_error(bf16_carry, params, batch_stats, x)
        # The output's dtype only: traced, not compiled.
        logits, _ = jax.eval_shape(
            lambda p, s, x: models.apply(f32_carry, p, s, x, train=True), params, batch_stats, x
        )
    assert logits.dtype == jnp.float32
    for s in ("stage0", "stage1"):
        # Measured ~1e-7 (float32 rebuild) against ~1e-2 with bfloat16 halves.
        assert good[s]["max_rel"] < 1e-5 < 1e-3 < bad[s]["max_rel"]


def test_exact_every_validated():
    with pytest.raises(ValueError, match="positive int"):
        _abstract(exact_every=0, **TINY)


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_drift_quick(tmp_path):
    # In a child with one CPU device, as notebook 03 runs the same depth-2 measurements: the
    # two then share the run's compiled programs (a compilation-cache entry belongs to one
    # device count).
    out = tmp_path / "results.pickle"
    run = ("import pickle, sys; from experiments import bench_drift; "
           "pickle.dump(bench_drift.main(sys.argv[1:-1]), open(sys.argv[-1], 'wb'))")
    done = subprocess.run(
        [sys.executable, "-c", run, "--quick", "--out-dir", str(tmp_path), str(out)],
        cwd=ROOT, env={**one_device_env(), "JAX_NUMPY_DTYPE_PROMOTION": "strict",
                       "JAX_NUMPY_RANK_PROMOTION": "raise"},  # the suite's settings
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    results = pickle.loads(out.read_bytes())
    md, png = tmp_path / "bench_drift.md", tmp_path / "bench_drift.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    first = text.splitlines()[0]
    assert "host cores" in first and "jax " in first
    assert "python -m experiments.bench_drift --quick" in first
    assert "## Depth sweep" in text and "## Options" in text and "## Per unit" in text
    assert {r["state"] for r in results["sweep"]} == {"init", "trained"}
    assert len(results["options"]) == 2 * len(bench_drift.QUICK_OPTIONS)
    for r in results["sweep"]:
        assert r["rec_max_rel"] < 1e-5 and r["rev_plain_cos"] > 0.999
    # The invertible chain (3 stages of 2 units, at init): rebuilt across both stride-2 entries.
    assert "## Invertible downsampling" in text
    (row,) = results["invertible"]
    assert row["rev_f64_rel"] < 1e-5 and row["rev_plain_rel"] < 1e-5, row  # measured 9e-7
    # Fixed point: the rebuild is bit-exact in float32 and with bfloat16 compute.
    assert "## Fixed point" in text
    for r in results["fixed"]:
        assert r["f32_mismatches"] == r["bf16_mismatches"] == 0 and r["float_mismatches"] > 0
