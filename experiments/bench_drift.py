"""Drift benchmark: how far the reversible backward's float32 gradients drift, and what helps.

For one reversible stage of basic units (stem 32 channels, halves of 16, digits images 8x8,
batch 16, BatchNorm in train mode), at initialisation and after training on digits:

1. **Depth sweep** (units per stage 2..64), raw drift (``exact_every=None``): reconstruction
   error of the rebuilt unit inputs (`revjax.drift.reconstruction_error`) and gradient
   agreement (relative error, cosine) of the reversible path against plain autodiff on the same
   weights and against a float64 plain reference, in float32 and with bfloat16 compute (float32
   carries); the default ``exact_every=8`` beside it (stored inputs at units n-8, n-16, ...:
   none up to 8 reversible units). Gives the depth at which the float32 error
   passes 1e-4 relative.
2. **Options** (9, 18, 32 units): the default (``exact_every=8``, epsilon 1e-3, two-pass
   variance), ``exact_every`` None / 2 / 4, BatchNorm epsilon 1e-5 and one-pass variance (with
   ``exact_every=None``, to show their effect on the raw drift), bfloat16 compute with float32
   or bfloat16 carries: gradient error of the reversible path and of the plain path of the same
   model against float64, the worst per-leaf ratio of the two, and compiled temporary memory
   of loss + grad (rolled scans, the GPU/TPU setting).
3. **Per unit** (18 units): where the error sits.
4. **Invertible downsampling**: a 3-stage RevNet with ``downsample='invertible'`` (27 units in
   one `revjax._chain.reversible_chain`, as RevNet-164's), ``exact_every`` None and 8.
5. **Fixed point** (``arithmetic="fixed"``, ``exact_every=None``; depth sweep): rebuild
   mismatches (elements whose bits differ) and largest error, gradient agreement with plain
   autodiff of the same fixed-point model, in float32 and with bfloat16 compute, beside the
   float arithmetic's; and both arithmetics' reversible gradients against float64 plain
   autodiff of the float model (what fixed-point rounding itself costs).
6. **Sequences** (`experiments._drift_sequence`): conv and transformer (LayerNorm + attention /
   LayerNorm + exact-GELU MLP) F/G in a `revjax.ReversibleSequence`, float vs fixed carries,
   float32 and bfloat16 compute, float32 and bfloat16 halves: what the real backward rebuilt,
   and gradients against plain autodiff.

Writes ``<out-dir>/bench_drift.md`` and ``bench_drift.png``::

    python -m experiments.bench_drift                 # ~10 minutes on 2 CPU cores
    python -m experiments.bench_drift --quick         # seconds, for CI
    python -m experiments.bench_drift --depths 9 18 --option-depths   # a part of the sweep

Scans are rolled (``unroll=1``) throughout: XLA:CPU compiles a fully unrolled 32-unit
backward for minutes, and at 8x8 images the slow rolled conv gradients (jax-ml/jax#12868)
cost little. Weights are drawn with NumPy from the constructor's distributions, since every
random init of a new shape costs an XLA compile on the CPU.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import _drift_sequence, _report
from revjax import models
from revjax.data import DigitsSource
from revjax.drift import gradient_agreement, reconstruction_error
from revjax.reference import (
    architecture,
    fill,
    float64_gradients,
    gradient_temp_bytes,
    gradients,
    variant,
)
from revjax.train import TrainConfig, make_optimizer

NAME = "bench_drift"
MODULE = "experiments.bench_drift"

BATCH = 16
WIDTHS = (32, 32)  # stem, stage: halves of 16 channels
# Invertible downsampling, 3 stages at 8x8, 4x4, 2x2: halves of 16, 64 and 256 channels.
INVERTIBLE_WIDTHS = (32, 32, 64, 128)
INVERTIBLE_UNITS = 9  # per stage: 27 units in one chain, as RevNet-164's
DEPTHS = (2, 4, 9, 18, 32, 64)
QUICK_DEPTHS = (2,)
OPTION_DEPTHS = (9, 18, 32)
QUICK_OPTION_DEPTHS = (2,)
TRAIN_STEPS = 60
QUICK_TRAIN_STEPS = 1
FLOAT32_TARGET = 1e-4

#: name -> RevNet overrides. The first is the default; ``None`` marks "same as default".
OPTIONS: dict[str, dict[str, Any]] = {
    "default (exact_every=8, eps 1e-3, two-pass var)": {},
    "exact_every=None": {"exact_every": None},
    "exact_every=2": {"exact_every": 2},
    "exact_every=4": {"exact_every": 4},
    "exact_every=None, eps 1e-5": {"exact_every": None, "bn_epsilon": 1e-5},
    "exact_every=None, fast variance": {"exact_every": None, "bn_fast_variance": True},
    "bf16 compute, f32 carry": {"dtype": jnp.bfloat16, "carry_dtype": jnp.float32},
    "bf16 compute, bf16 carry": {"dtype": jnp.bfloat16},
}
OPTION_DEFAULT = "default (exact_every=8, eps 1e-3, two-pass var)"
QUICK_OPTIONS = (
    "default (exact_every=8, eps 1e-3, two-pass var)",
    "exact_every=None",
    "bf16 compute, f32 carry",
)
# Options that change the computed function (so they need their own plain and float64
# references); exact_every and the carry only change how the backward gets its activations.
_BN_KEYS = ("bn_epsilon", "bn_fast_variance")


# --------------------------------------------------------------------------------------------
# Models, weights, data
# --------------------------------------------------------------------------------------------


def build(units: int, *, seed: int = 0, **overrides) -> nnx.Module:
    """A one-stage RevNet for digits (``units`` per stage), weights drawn with NumPy."""
    model = nnx.eval_shape(
        lambda: models.RevNet(
            (units,),
            WIDTHS,
            in_channels=1,
            unroll=1,
            rngs=nnx.Rngs(0),
            **{"arithmetic": "float", "exact_every": 8, **overrides},
        )
    )
    return fill(model, seed)


def digits_batches(batch: int, seed: int = 0):
    """Endless shuffled digits batches: ``(images [batch, 8, 8, 1] in [0, 1], labels)``."""
    src = DigitsSource("train")
    images = np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32) / 255.0
    labels = np.asarray([src[i]["label"] for i in range(len(src))], np.int32)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(labels))
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start : start + batch]
            yield jnp.asarray(images[idx]), jnp.asarray(labels[idx])


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def with_peaks(model: nnx.Module, batch_stats: nnx.State, **overrides) -> nnx.State:
    """``batch_stats`` of ``model``, plus the zero `revjax.CarryPeak` s that its variant with
    ``overrides`` (fixed-point arithmetic) also holds."""
    config = architecture(model, overrides)
    abstract = nnx.eval_shape(lambda: models.RevNet(**config, rngs=nnx.Rngs(0)))
    _, _, stats = models.functional(abstract)
    given = dict(nnx.to_flat_state(batch_stats))
    for path, leaf in nnx.to_flat_state(stats):
        value = given[path].get_value() if path in given else jnp.zeros(leaf.shape, leaf.dtype)
        nnx.replace_by_pure_dict(stats, _nested(path, value))
    return stats


def _nested(path: tuple, value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def reference_gradients(model, params, batch_stats, x, y, **overrides):
    """``(plain float32 gradients, float64 gradients)`` of the model with ``overrides``."""
    with jax.numpy_dtype_promotion("standard"):
        plain = gradients(
            variant(model, memory_saving=False, **overrides), params, batch_stats, x, y
        )
    return jax.device_get(plain), float64_gradients(model, params, batch_stats, x, y, **overrides)


def train(model: nnx.Module, steps: int, *, seed: int = 0):
    """``steps`` SGD steps of the paper's recipe (lr 0.1, momentum 0.9, weight decay 2e-4) on
    digits; returns ``(params, batch_stats, final loss)``."""
    graphdef, params, batch_stats = models.functional(model)
    tx = make_optimizer(TrainConfig(lr_boundaries=()))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss(p):
            logits, new_stats = models.apply(graphdef, p, batch_stats, x, train=True)
            xent = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.mean(xent), new_stats

        (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, value

    data = digits_batches(64, seed)
    value = jnp.nan
    for _ in range(steps):
        x, y = next(data)
        params, batch_stats, opt_state, value = step(params, batch_stats, opt_state, x, y)
    return params, batch_stats, float(value)


def temp_bytes(model: nnx.Module, **overrides) -> int:
    """Compiled temporary bytes of loss + grad on a digits batch (rolled scan, nothing runs)."""
    return gradient_temp_bytes(model, BATCH, 8, **overrides)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _with_promotion(fn, *args, **kwargs):
    # Flax's BatchNorm promotes bfloat16 statistics with float32, which strict promotion
    # (the test suite's setting) rejects.
    with jax.numpy_dtype_promotion("standard"):
        return fn(*args, **kwargs)


def measure_depth(
    n: int, steps: int, x, y, *, options: Sequence[str] = (), per_unit: bool = False
) -> dict:
    """Everything measured at ``n`` units per stage, at init and after ``steps`` of training.

    Returns ``{"sweep": [rows], "options": [rows], "per_unit": [rows]}``.
    """
    model = build(n)
    graphdef, params, batch_stats = models.functional(model)
    t0 = time.perf_counter()
    trained = train(model, steps)
    states = {"init": (params, batch_stats), "trained": trained[:2]}
    out: dict[str, list] = {"sweep": [], "options": [], "per_unit": [], "fixed": []}
    raw = variant(model, exact_every=None)  # the drift itself: no stored inputs
    bf16 = {"dtype": jnp.bfloat16, "carry_dtype": jnp.float32, "exact_every": None}
    for state_name, (p, s) in states.items():
        rec = reconstruction_error(raw, p, s, x)["stage0"]
        g_raw = jax.device_get(gradients(raw, p, s, x, y))
        g_def = jax.device_get(gradients(graphdef, p, s, x, y))
        g_plain, g64 = reference_gradients(model, p, s, x, y)
        raw_plain = gradient_agreement(g_raw, g_plain)
        gd_b = variant(model, **bf16)
        rec_b = _with_promotion(reconstruction_error, gd_b, p, s, x)["stage0"]
        gb_rev = _with_promotion(gradients, gd_b, p, s, x, y)
        gb_plain = _with_promotion(
            gradients, variant(model, memory_saving=False, **bf16), p, s, x, y
        )
        bf_plain = gradient_agreement(gb_rev, gb_plain)
        out["sweep"].append(
            {
                "units": n,
                "state": state_name,
                "rec_max_rel": rec["max_rel"],
                "rec_channel_rel": rec["channel_rel"],
                "rev_plain_rel": raw_plain["rel"],
                "rev_plain_cos": raw_plain["cos"],
                "default_plain_rel": gradient_agreement(g_def, g_plain)["rel"],
                "rev_f64_rel": gradient_agreement(g_raw, g64)["rel"],
                "plain_f64_rel": gradient_agreement(g_plain, g64)["rel"],
                "bf16_rec_max_rel": rec_b["max_rel"],
                "bf16_rev_plain_rel": bf_plain["rel"],
                "bf16_rev_plain_cos": bf_plain["cos"],
            }
        )
        row = {
            "units": n,
            "state": state_name,
            "float_mismatches": rec["mismatches"],
            "float_rev_plain_rel": raw_plain["rel"],
            "float_rev_plain_cos": raw_plain["cos"],
            "float_rev_f64_rel": gradient_agreement(g_raw, g64)["rel"],
            "float_bf16_mismatches": rec_b["mismatches"],
            "float_bf16_rev_plain_rel": bf_plain["rel"],
            "float_bf16_rev_plain_cos": bf_plain["cos"],
        }
        for tag, extra in (("f32", {}), ("bf16", bf16)):
            fixed = {**extra, "arithmetic": "fixed", "exact_every": None}
            s_fx = with_peaks(model, s, **fixed)
            gd_fx = variant(model, **fixed)
            rec_fx = _with_promotion(reconstruction_error, gd_fx, p, s_fx, x)["stage0"]
            g_fx = _with_promotion(gradients, gd_fx, p, s_fx, x, y)
            g_fx_plain = _with_promotion(
                gradients, variant(model, memory_saving=False, **fixed), p, s_fx, x, y
            )
            agree = gradient_agreement(g_fx, g_fx_plain)
            row[f"{tag}_mismatches"] = rec_fx["mismatches"]
            row[f"{tag}_rec_max_abs"] = rec_fx["max_abs"]
            row[f"{tag}_rev_plain_rel"] = agree["rel"]
            row[f"{tag}_rev_plain_cos"] = agree["cos"]
            row[f"{tag}_rev_f64_rel"] = gradient_agreement(g_fx, g64)["rel"]
        out["fixed"].append(row)
        known = {"exact_every=None": (g_raw, rec), OPTION_DEFAULT: (g_def, None)}
        if options:
            out["options"] += _options_rows(
                model, state_name, (p, s, x, y), (g_plain, g64), known, options
            )
        if per_unit:
            out["per_unit"] += _per_unit_rows(n, state_name, rec, g_raw, g_def, g_plain, g64)
    print(
        f"  {n} units: {time.perf_counter() - t0:.0f} s (train loss {trained[2]:.3f})", flush=True
    )
    return out


def measure_invertible(
    units: int, steps: int, x, y, *, exact_every: Sequence[int | None] = (None, 8)
) -> list[dict]:
    """Drift of a whole invertible-downsampling RevNet (`reversible_chain`: every stage's
    output is rebuilt from the next stage, so the rebuilt chain spans all ``3 * units`` units),
    at init and after ``steps`` of training: gradients with ``exact_every`` None and 8 against
    plain float32 and float64 autodiff, and compiled temp memory."""
    model = fill(
        nnx.eval_shape(
            lambda: models.RevNet(
                (units,) * 3,
                INVERTIBLE_WIDTHS,
                in_channels=1,
                strides=(1, 2, 2),
                downsample="invertible",
                unroll=1,
                arithmetic="float",
                rngs=nnx.Rngs(0),
            )
        )
    )
    _, params, batch_stats = models.functional(model)
    t0 = time.perf_counter()
    states = {"init": (params, batch_stats)}
    if steps:
        states["trained"] = train(model, steps)[:2]
    rows = []
    for state_name, (p, s) in states.items():
        g_plain, g64 = reference_gradients(model, p, s, x, y)
        plain64 = gradient_agreement(g_plain, g64)["rel"]
        for k in exact_every:
            gd = variant(model, exact_every=k)
            g = jax.device_get(gradients(gd, p, s, x, y))
            rows.append(
                {
                    "units": 3 * units,
                    "state": state_name,
                    "exact_every": k,
                    "rev_plain_rel": gradient_agreement(g, g_plain)["rel"],
                    "rev_f64_rel": gradient_agreement(g, g64)["rel"],
                    "plain_f64_rel": plain64,
                    "temp": temp_bytes(model, exact_every=k) if state_name == "init" else None,
                }
            )
    print(f"  invertible, {3 * units} units: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _options_rows(model, state_name, data, refs, known, names):
    p, s, x, y = data
    rows = []
    n = model.units_per_stage[0]
    for name in names:
        opts = OPTIONS[name]
        gd = variant(model, **opts)
        rev, rec = known.get(name, (None, None))
        if rev is None:
            rev = jax.device_get(_with_promotion(gradients, gd, p, s, x, y))
        if rec is None:
            rec = _with_promotion(reconstruction_error, gd, p, s, x)["stage0"]
        bn = {k: v for k, v in opts.items() if k in _BN_KEYS}
        if bn:
            plain, ref = reference_gradients(model, p, s, x, y, **bn)
        elif "dtype" in opts:
            plain_gd = variant(model, **{**opts, "memory_saving": False})
            plain, ref = jax.device_get(_with_promotion(gradients, plain_gd, p, s, x, y)), refs[1]
        else:
            plain, ref = refs
        rev64, plain64 = gradient_agreement(rev, ref), gradient_agreement(plain, ref)
        ratios = [
            rev64["leaves"][k]["rel"] / max(plain64["leaves"][k]["rel"], 1e-30)
            for k, leaf in rev64["leaves"].items()
            if leaf["significant"]
        ]
        rows.append(
            {
                "units": n,
                "state": state_name,
                "option": name,
                "rev_f64_rel": rev64["rel"],
                "plain_f64_rel": plain64["rel"],
                "worst_leaf_ratio": max(ratios),
                "rec_max_rel": rec["max_rel"],
                "temp": temp_bytes(model, **opts) if state_name == "init" else None,
            }
        )
    return rows


def _unit_slices(grads, i: int) -> list[np.ndarray]:
    """Gradient leaves of reversible unit ``i`` (F and G) of the first stage."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        key = jax.tree_util.keystr(path)
        if key.startswith(("['stages'][0]['reversible']['f']", "['stages'][0]['reversible']['g']")):
            out.append(np.asarray(leaf[i], np.float64))
    return out


def _per_unit_rows(n, state_name, rec, g_raw, g_def, g_plain, g64) -> list[dict]:
    rows = []
    per = rec["per_unit"]
    for i in range(n - 1):
        ref = _unit_slices(g64, i)
        norm = math.sqrt(sum(float(np.sum(r * r)) for r in ref))

        def err(g, ref=ref, norm=norm, i=i):
            d = sum(float(np.sum((a - b) ** 2)) for a, b in zip(_unit_slices(g, i), ref))
            return math.sqrt(d) / max(norm, 1e-300)

        rows.append(
            {
                "units": n,
                "state": state_name,
                "unit": i,
                "rec_rel": float(per["rel"][i]),
                "rec_channel_rel": float(per["channel_rel"][i]),
                "scale": float(per["scale"][i]),
                "rev_f64_rel": err(g_raw),
                "default_f64_rel": err(g_def),
                "plain_f64_rel": err(g_plain),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _e(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def first_depth_above(rows: Sequence[Mapping], key: str, limit: float) -> dict[str, int | None]:
    """Per state, the smallest depth whose ``key`` exceeds ``limit`` (None: none does)."""
    out: dict[str, int | None] = {}
    for r in sorted(rows, key=lambda r: r["units"]):
        out.setdefault(r["state"], None)
        if out[r["state"]] is None and r[key] > limit:
            out[r["state"]] = r["units"]
    return out


def report(results: dict, command: str, steps: int) -> str:
    sweep, options, per_unit = results["sweep"], results["options"], results["per_unit"]
    lines = [
        _report.header(
            "Numerical drift of reversible float32 gradients",
            f"one RevNet stage of basic units (halves of 16 channels), digits 8x8, batch {BATCH}, "
            f"BatchNorm in train mode, init and after {steps} SGD steps on digits",
            command,
        ),
        "",
        "## Depth sweep",
        "",
        "The raw drift (`exact_every=None`): largest error of a rebuilt unit input relative to "
        "that unit's largest activation (`max_rel`), and in units of each channel's batch std "
        "(what the next BatchNorm sees); global relative error and cosine of the reversible "
        "gradients against plain autodiff on the same weights and dtype, and of both against "
        "a float64 plain reference. `default (k=8)`: the default `exact_every=8`. bf16: F and G "
        "compute in bfloat16, halves carried in float32.",
        "",
    ]
    cols = [
        "units",
        "weights",
        "rebuild max_rel",
        "rebuild per-channel",
        "rev vs plain",
        "cos",
        "default (k=8) vs plain",
        "rev vs f64",
        "plain f32 vs f64",
        "bf16 rebuild max_rel",
        "bf16 rev vs plain",
        "bf16 cos",
    ]
    rows = [
        [
            r["units"],
            r["state"],
            _e(r["rec_max_rel"]),
            _e(r["rec_channel_rel"]),
            _e(r["rev_plain_rel"]),
            f"{r['rev_plain_cos']:.7f}",
            _e(r["default_plain_rel"]),
            _e(r["rev_f64_rel"]),
            _e(r["plain_f64_rel"]),
            _e(r["bf16_rec_max_rel"]),
            _e(r["bf16_rev_plain_rel"]),
            f"{r['bf16_rev_plain_cos']:.5f}",
        ]
        for r in sorted(sweep, key=lambda r: (r["state"], r["units"]))
    ]
    lines += [_report.markdown_table(cols, rows), ""]
    above = first_depth_above(sweep, "rev_plain_rel", FLOAT32_TARGET)
    lines.append(
        "Depth at which the float32 reversible gradient differs from plain float32 autodiff by "
        f"more than {FLOAT32_TARGET:g} (relative): "
        + ", ".join(
            f"{k}: {v if v is not None else 'none up to ' + str(max(r['units'] for r in sweep))}"
            for k, v in above.items()
        )
        + "."
    )
    lines.append("")
    if options:
        lines += [
            "## Options",
            "",
            "Gradient error of the reversible path and of plain autodiff of the same model, both "
            "against float64 plain autodiff of that model; worst ratio of the two over parameter "
            "leaves with a non-negligible gradient (norm >= 1e-3 x the largest); compiled temp "
            "memory of loss + grad (rolled scan, XLA memory_analysis).",
            "",
        ]
        unit, scale = _report.byte_unit([r["temp"] for r in options if r["temp"]])
        cols = [
            "units",
            "weights",
            "option",
            "rev vs f64",
            "plain vs f64",
            "worst leaf ratio",
            "rebuild max_rel",
            f"temp {unit}",
        ]
        temps = {(r["units"], r["option"]): r["temp"] for r in options if r["temp"] is not None}
        rows = [
            [
                r["units"],
                r["state"],
                r["option"],
                _e(r["rev_f64_rel"]),
                _e(r["plain_f64_rel"]),
                f"{r['worst_leaf_ratio']:.2f}",
                _e(r["rec_max_rel"]),
                f"{temps[r['units'], r['option']] / scale:.1f}",
            ]
            for r in sorted(options, key=lambda r: (r["state"], r["units"]))
        ]
        lines += [_report.markdown_table(cols, rows), ""]
    if results.get("fixed"):
        lines += [
            "## Fixed point: exact rebuild (`arithmetic='fixed'`)",
            "",
            "The same stage with `exact_every=None`, its halves carried as int32 fixed point "
            "(16 fraction bits) inside the reversible units: `mismatches` counts rebuilt "
            "elements whose bits differ from the forward's (all units; float arithmetic "
            "differs almost everywhere), `rev vs plain` / `cos` compare the reversible "
            "gradients with plain autodiff of the same model and arithmetic, `vs f64` with "
            "float64 plain autodiff of the float model (what rounding to the grid costs). "
            "bf16: F and G compute in bfloat16.",
            "",
        ]
        cols = [
            "units",
            "weights",
            "f32 float: mismatches",
            "rev vs plain",
            "cos",
            "f32 fixed: mismatches",
            "rev vs plain",
            "cos",
            "float vs f64",
            "fixed vs f64",
            "bf16 float: mismatches",
            "rev vs plain",
            "cos",
            "bf16 fixed: mismatches",
            "rev vs plain",
            "cos",
        ]
        rows = [
            [
                r["units"],
                r["state"],
                r["float_mismatches"],
                _e(r["float_rev_plain_rel"]),
                f"{r['float_rev_plain_cos']:.7f}",
                r["f32_mismatches"],
                _e(r["f32_rev_plain_rel"]),
                f"{r['f32_rev_plain_cos']:.7f}",
                _e(r["float_rev_f64_rel"]),
                _e(r["f32_rev_f64_rel"]),
                r["float_bf16_mismatches"],
                _e(r["float_bf16_rev_plain_rel"]),
                f"{r['float_bf16_rev_plain_cos']:.5f}",
                r["bf16_mismatches"],
                _e(r["bf16_rev_plain_rel"]),
                f"{r['bf16_rev_plain_cos']:.7f}",
            ]
            for r in sorted(results["fixed"], key=lambda r: (r["state"], r["units"]))
        ]
        lines += [_report.markdown_table(cols, rows), ""]
    if results.get("invertible"):
        lines += [
            "## Invertible downsampling: one chain across stages",
            "",
            "A RevNet with `downsample='invertible'` (3 stages of basic units at 8x8, 4x4, 2x2; "
            "halves of 16, 64, 256 channels) rebuilds every stage's output from the next stage: "
            "the rebuilt chain spans all the units. Gradient error of the reversible path against "
            "plain float32 and float64 autodiff on the same weights; compiled temp of loss + grad.",
            "",
        ]
        cols = ["units", "weights", "exact_every", "rev vs plain", "rev vs f64", "plain vs f64"]
        cols.append("temp MiB")
        rows = []
        temps = {r["exact_every"]: r["temp"] for r in results["invertible"] if r["temp"]}
        for r in results["invertible"]:
            rows.append(
                [
                    r["units"],
                    r["state"],
                    str(r["exact_every"]),
                    _e(r["rev_plain_rel"]),
                    _e(r["rev_f64_rel"]),
                    _e(r["plain_f64_rel"]),
                    f"{temps[r['exact_every']] / 2**20:.2f}",
                ]
            )
        lines += [_report.markdown_table(cols, rows), ""]
    if per_unit:
        lines += [
            "## Per unit",
            "",
            "Reversible unit i of the stage (0 = first after the entry unit), raw drift "
            "(`exact_every=None`): rebuilt-input error (relative, and per channel in batch-std "
            "units), largest activation, and the relative error of that unit's F and G "
            "parameter gradients against float64 (raw, default `exact_every=8`, plain).",
            "",
        ]
        cols = [
            "weights",
            "unit",
            "rebuild rel",
            "rebuild per-channel",
            "max |x|",
            "rev grad vs f64",
            "default (k=8) vs f64",
            "plain grad vs f64",
        ]
        rows = [
            [
                r["state"],
                r["unit"],
                _e(r["rec_rel"]),
                _e(r["rec_channel_rel"]),
                f"{r['scale']:.1f}",
                _e(r["rev_f64_rel"]),
                _e(r["default_f64_rel"]),
                _e(r["plain_f64_rel"]),
            ]
            for r in per_unit
        ]
        lines += [_report.markdown_table(cols, rows), ""]
    return "\n".join(lines)


def plot(path: Path, sweep: Sequence[Mapping]) -> Path:
    """Log-scale errors against depth (matplotlib object API with the Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = {
        "rebuild max_rel": "rec_max_rel",
        "rev vs plain (f32, exact_every=None)": "rev_plain_rel",
        "default exact_every=8 vs plain": "default_plain_rel",
        "plain f32 vs f64": "plain_f64_rel",
        "bf16 rev vs plain": "bf16_rev_plain_rel",
    }
    markers = "osD^v<>"
    for state, dash in (("init", "-"), ("trained", "--")):
        rows = sorted((r for r in sweep if r["state"] == state), key=lambda r: r["units"])
        for i, (label, key) in enumerate(lines.items()):
            ax.plot(
                [r["units"] for r in rows],
                [max(r[key], 1e-12) for r in rows],
                marker=markers[i],
                linestyle=dash,
                color=f"C{i}",
                markerfacecolor="none",
                label=f"{label} ({state})",
            )
    ax.axhline(FLOAT32_TARGET, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_title("Reversible drift vs depth (relative errors)", fontsize=10)
    ax.set_xlabel("units per stage")
    ax.set_ylabel("relative error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny depths, seconds (CI)")
    parser.add_argument("--out-dir", default="results", help="where the .md and .png go")
    parser.add_argument("--depths", type=int, nargs="+", help=f"sweep depths (default {DEPTHS})")
    parser.add_argument(
        "--option-depths",
        type=int,
        nargs="*",
        help=f"depths of the options table (default {OPTION_DEPTHS}; none: skip it)",
    )
    parser.add_argument(
        "--sequences",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the conv / transformer sequence section (default on)",
    )
    parser.add_argument(
        "--invertible",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the invertible-downsampling chain section (default on)",
    )
    args = parser.parse_args(argv)
    depths = QUICK_DEPTHS if args.quick else DEPTHS
    option_depths = QUICK_OPTION_DEPTHS if args.quick else OPTION_DEPTHS
    if args.depths:
        depths = tuple(args.depths)
    if args.option_depths is not None:
        option_depths = tuple(args.option_depths)
    per_unit_depth = 2 if args.quick else 18
    names = QUICK_OPTIONS if args.quick else tuple(OPTIONS)
    steps = QUICK_TRAIN_STEPS if args.quick else TRAIN_STEPS
    x, y = next(digits_batches(BATCH, seed=1))
    results: dict[str, list] = {"sweep": [], "options": [], "per_unit": [], "fixed": []}
    for n in sorted(set(depths) | set(option_depths)):
        out = measure_depth(
            n,
            steps,
            x,
            y,
            options=names if n in option_depths else (),
            per_unit=n == per_unit_depth,
        )
        for key in results:
            if key not in ("sweep", "fixed") or n in depths:
                results[key] += out[key]
    if args.invertible:
        if args.quick:  # 6 units, at init, stored inputs none: the section's plumbing
            results["invertible"] = measure_invertible(2, 0, x, y, exact_every=(None,))
        else:
            results["invertible"] = measure_invertible(INVERTIBLE_UNITS, steps, x, y)
    out_dir = Path(args.out_dir)
    text = report(results, _report.command_line(MODULE, argv), steps)
    if args.sequences:
        text += "\n" + _drift_sequence.markdown(_drift_sequence.measure(args.quick))
    _report.write_report(out_dir, NAME, text)
    plot(out_dir / f"{NAME}.png", results["sweep"])
    return results


if __name__ == "__main__":
    main()
