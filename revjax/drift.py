"""Numerical drift of reversible units: reconstruction error, gradient agreement, a monitor.

The backward pass of a reversible sequence rebuilds every unit's input from its output
(``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``). In exact arithmetic that is the stored activation;
in floating point it differs by rounding, and the difference accumulates from the last unit
of a stage back to the first. This module measures that difference on a `revjax.RevNet`
exactly as the backward sees it: BatchNorm in train mode with batch statistics, the same
carry dtype, and with ``exact_every=k`` the stored exact inputs of units n-k, n-2k, ...::

    errors = reconstruction_error(model, None, None, images)   # per stage
    monitor = DriftMonitor(graphdef, threshold=1e-3)           # in a training loop
    metrics = monitor.check(params, batch_stats, images)       # warns with DriftWarning
    gradient_agreement(reversible_grads, reference_grads)       # rel. error and cosine

Mechanism (measured in ``experiments/bench_drift.py``, ``results/bench_drift.md``): each
rebuild ``x = y - F(...)`` rounds relative to ``|y|``, and activations grow along a stage, so
the rebuilt-input error accumulates towards the stage's first unit (float32: ~5e-8 relative at
the last unit, ~5e-6 at the first of 17). That alone is harmless, but the backward
recomputes the ReLU masks and BatchNorm batch statistics from the rebuilt activations: every
pre-activation within that error of zero may flip its mask, and one flipped element changes
the gradient by O(1 / sqrt(elements per channel)), which BatchNorm spreads over its whole
channel. Plain float32 autodiff flips masks too (relative to float64), but from ~1e-7
perturbations, so far fewer. Gradients of deep stages were off by up to ~1e-2 relative (plain:
~1e-6), mostly in the first units and the entry unit before them. With float arithmetic,
``RevNet(arithmetic="float", exact_every=8)`` bounds the accumulation to 8 units and brings
them back to plain's accuracy;
BatchNorm epsilon 1e-3 (vs Flax's 1e-5) and two-pass variance reduce the amplification.

Fixed-point models (``arithmetic="fixed"``) carry the halves as int32 inside the reversible
units and rebuild them bit for bit: `reconstruction_error` and `DriftMonitor` then report zero
error and count ``mismatches``, the rebuilt elements whose bits differ from the forward's. They
run a separate rebuild of a `revjax.RevNet`; the training step's own backward counts its
mismatched units for any model built on `revjax.ReversibleSequence` (`revjax.rebuild_mismatches`,
`revjax.check_rebuild`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from revjax._carry import make_carry
from revjax._coupling import additive_coupling
from revjax._sequence import exact_range, exact_slot
from revjax._units import default_unroll, unit_forward, unit_inverse
from revjax.layers import pure_call

Array = jax.Array

__all__ = [
    "DriftMonitor",
    "DriftWarning",
    "gradient_agreement",
    "reconstruction_error",
]


class DriftWarning(RuntimeWarning):
    """The rebuilt activations of a reversible stage differ from the stored ones by more than
    the monitor's threshold."""


# --------------------------------------------------------------------------------------------
# Reconstruction error
# --------------------------------------------------------------------------------------------


def _stage_reconstruction(stage, h1, h2, exact_every, arithmetic="float", frac_bits=16):
    """Forward through one RevStage storing every reversible unit's input, then the rebuild.

    Both run the core's own unit (`revjax._units.unit_forward` / `unit_inverse`) on the
    model's carries: floats, or int32 fixed point, where the rebuild should be bit-exact.

    Returns:
      ``((y1, y2), stats)``: the stage output and per-unit error statistics of the rebuilt
      inputs, each shaped ``[units - 1]``.
    """
    y1, y2 = stage.entry(h1, h2, train=True)
    if not stage.num_reversible:
        return (y1, y2), None
    n = stage.num_reversible
    f_def, f_state = nnx.split(stage.reversible.f)
    g_def, g_state = nnx.split(stage.reversible.g)
    f_call, g_call = pure_call(f_def), pure_call(g_def)
    # Train mode, batch statistics: what the forward and the backward's recomputation use.
    # The core's residual-function protocol: (params, x, key, context) -> (h, aux).
    f = lambda p, a, key, ctx: (f_call(p, a, train=True)[0], None)
    g = lambda p, a, key, ctx: (g_call(p, a, train=True)[0], None)
    cpl = additive_coupling  # RevNet's coupling; casts F/G outputs to the carry dtype
    arith = make_carry(arithmetic, frac_bits, y1.dtype)
    unroll = default_unroll(n)

    def forward(carry, params):
        a1, a2 = carry
        (b1, b2), _, _, _ = unit_forward(arith, cpl, f, g, *params, None, None, a1, a2)
        return (b1, b2), (a1, a2)

    # stored: every unit's exact input carry, [n, N, H, W, C/2] per half.
    c1, c2 = arith.enter(y1), arith.enter(y2)
    (z1, z2), stored = lax.scan(forward, (c1, c2), (f_state, g_state), unroll=unroll)

    def inverse(carry, xs):
        i, fp, gp, s1, s2 = xs
        a1, a2 = unit_inverse(arith, cpl, f, g, fp, gp, None, None, *carry)
        if exact_every is not None:
            # The memory-saving backward uses the stored inputs of units n-k, n-2k, ... > 0.
            keep, _ = exact_slot(i, *exact_range(n, exact_every), exact_every)
            a1, a2 = jnp.where(keep, s1, a1), jnp.where(keep, s2, a2)
        return (a1, a2), (a1, a2)

    _, rebuilt = lax.scan(
        inverse,
        (z1, z2),
        (jnp.arange(n), f_state, g_state, *stored),
        reverse=True,
        unroll=unroll,
    )
    mismatches = sum(
        jnp.sum(r != s, axis=tuple(range(1, s.ndim))) for r, s in zip(rebuilt, stored)
    )  # [n]: elements whose bits differ
    view = lambda t: tuple(jax.vmap(arith.view)(a) for a in t)
    stats = _unit_errors(view(stored), view(rebuilt))
    stats["mismatches"] = mismatches
    return (arith.leave(z1), arith.leave(z2)), stats


def _reconstruction_arrays(graphdef, params, batch_stats, x) -> dict[str, dict[str, Array]]:
    """Pure, jit-able core of `reconstruction_error`: per stage, per-unit statistics."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    if not hasattr(model, "stem_halves") or not hasattr(model, "stages"):
        raise TypeError(
            f"reconstruction_error needs a revjax.RevNet (or its graphdef), got "
            f"{type(model).__name__}. For a model built on revjax.ReversibleSequence with "
            "arithmetic='fixed', the training step's backward counts its own rebuild "
            "mismatches: see revjax.rebuild_mismatches and revjax.check_rebuild."
        )
    exact_every = model.exact_every if model.memory_saving else None
    h1, h2 = model.stem_halves(x, train=True)
    out = {}
    for s, stage in enumerate(model.stages):
        (h1, h2), stats = _stage_reconstruction(stage, h1, h2, exact_every, *_arithmetic_of(model))
        if stats is not None:
            out[f"stage{s}"] = stats
    return out


def _unit_errors(stored, rebuilt) -> dict[str, Array]:
    """Per-unit error statistics of rebuilt vs stored inputs (both halves together)."""
    axes = tuple(range(1, stored[0].ndim))  # all but the unit axis
    diff = [r - s for r, s in zip(rebuilt, stored)]
    max_abs = jnp.maximum(*(jnp.max(jnp.abs(d), axis=axes) for d in diff))
    scale = jnp.maximum(*(jnp.max(jnp.abs(s), axis=axes) for s in stored))
    sq_err = sum(jnp.sum(jnp.square(d), axis=axes) for d in diff)
    sq_ref = sum(jnp.sum(jnp.square(s), axis=axes) for s in stored)
    tiny = jnp.asarray(math.sqrt(float(jnp.finfo(stored[0].dtype).tiny)), stored[0].dtype)
    # BatchNorm sees each channel in units of its batch standard deviation: the error in those
    # units is what it passes on (and amplifies where a channel is nearly constant).
    chan_axes = tuple(range(1, stored[0].ndim - 1))  # batch and spatial axes
    chan_rel = jnp.maximum(
        *(
            jnp.max(
                jnp.sqrt(jnp.mean(jnp.square(d), axis=chan_axes))
                / jnp.maximum(jnp.std(s, axis=chan_axes), tiny),
                axis=-1,
            )
            for d, s in zip(diff, stored)
        )
    )
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / jnp.maximum(scale, tiny),
        "rel": jnp.sqrt(sq_err) / jnp.maximum(jnp.sqrt(sq_ref), tiny),
        "channel_rel": chan_rel,
        "scale": scale,
    }


def _arithmetic_of(model) -> tuple[str, int]:
    """The model's carry arithmetic and fraction bits (float for models without the option)."""
    return getattr(model, "arithmetic", "float"), getattr(model, "frac_bits", 16)


_reconstruction_jit = jax.jit(_reconstruction_arrays, static_argnums=0)


def reconstruction_error(
    model_or_graphdef: nnx.Module | nnx.GraphDef,
    params: nnx.State | None = None,
    batch_stats: nnx.State | None = None,
    x: Array | None = None,
) -> dict[str, dict[str, Any]]:
    """Error of every reversible unit's rebuilt input against the stored forward activation.

    Runs the RevNet forward in train mode (BatchNorm with batch statistics, as the backward's
    recomputation does), keeps each reversible unit's exact input, then rebuilds the inputs from
    each stage's output unit by unit in reverse, as the memory-saving backward does (with the
    model's ``exact_every``, the stored exact inputs of units n-k, n-2k, ... are used, so those
    units show zero error). Nothing is differentiated and no state changes.

    Args:
      model_or_graphdef: a `revjax.RevNet`, or the graphdef from `revjax.functional`.
      params: trainable parameters (``None`` with a module: its own).
      batch_stats: BatchNorm running averages (``None`` with a module: its own); unused in
        train mode but part of the model.
      x: images [N, H, W, C]; with a module, also accepted as the second positional
        argument (``reconstruction_error(model, x)``).

    Returns:
      ``{"stage<i>": stats}`` for every stage with reversible units (the entry unit stores its
      input, so it has no error), where ``stats`` has floats ``max_abs`` (largest absolute
      error of any rebuilt element), ``max_rel`` (over units, largest absolute error divided by
      that unit's largest absolute activation), ``rel`` (over units, largest
      ``||rebuilt - stored|| / ||stored||``), ``channel_rel`` (over units and channels, the
      largest RMS error in units of the channel's batch standard deviation: the error as the
      next BatchNorm sees it), ``mismatches`` (int: rebuilt elements whose bits differ from
      the stored ones, over all units; 0 is a bit-exact rebuild, what fixed-point models
      give wherever XLA computes F/G the same way twice; float models differ almost
      everywhere), and ``per_unit``: a dict of NumPy arrays ``[units - 1]`` with the same
      statistics and ``scale`` (largest absolute activation) per unit.

    With ``arithmetic="fixed"`` the forward and the rebuild run on the model's int32 carries,
    as the memory-saving backward does; errors are measured on their values.
    """
    if x is None and isinstance(params, (jax.Array, np.ndarray)):  # reconstruction_error(m, x)
        params, x = None, params
    if x is None:
        raise TypeError(
            "reconstruction_error needs the images x: reconstruction_error(model, x), or "
            "reconstruction_error(graphdef, params, batch_stats, x)."
        )
    if isinstance(model_or_graphdef, nnx.Module):
        graphdef, own_params, own_stats = nnx.split(model_or_graphdef, nnx.Param, nnx.BatchStat)
        params = own_params if params is None else params
        batch_stats = own_stats if batch_stats is None else batch_stats
    else:
        graphdef = model_or_graphdef
        if params is None or batch_stats is None:
            raise TypeError("With a graphdef, pass params and batch_stats too.")
    arrays = _reconstruction_jit(graphdef, params, batch_stats, x)
    return _summarise(jax.device_get(arrays))


def _summarise(arrays: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for stage, stats in arrays.items():
        per_unit = {k: np.asarray(v, np.float64) for k, v in stats.items()}
        out[stage] = {
            "max_abs": float(per_unit["max_abs"].max()),
            "max_rel": float(per_unit["max_rel"].max()),
            "rel": float(per_unit["rel"].max()),
            "channel_rel": float(per_unit["channel_rel"].max()),
            "mismatches": int(per_unit["mismatches"].sum()),
            "per_unit": per_unit,
        }
    return out


# --------------------------------------------------------------------------------------------
# Gradient agreement
# --------------------------------------------------------------------------------------------


def _cosine(dot: float, norms: float, tiny: float) -> float:
    """``dot / norms`` clipped to [-1, 1] (rounding can put a cosine of equal vectors a bit
    above 1)."""
    return float(np.clip(dot / max(norms, tiny), -1.0, 1.0))


def gradient_agreement(
    grads: Any, ref_grads: Any, *, min_relative_norm: float = 1e-3
) -> dict[str, Any]:
    """How closely ``grads`` match ``ref_grads`` (e.g. reversible vs plain, or vs float64).

    Computed on the host in float64, so any dtypes compare.

    Args:
      grads: a pytree of gradients.
      ref_grads: the reference, same structure.
      min_relative_norm: a leaf counts as having a non-negligible gradient when its reference
        norm is at least this fraction of the largest leaf's.

    Returns:
      ``rel`` (global ``||g - ref|| / ||ref||``), ``cos`` (global cosine similarity),
      ``max_leaf_rel`` (largest per-leaf relative error over non-negligible leaves) and
      ``leaves``: ``{path: {"rel", "cos", "norm", "significant"}}``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    ref_flat = jax.tree.leaves(ref_grads)
    if len(flat) != len(ref_flat) or treedef != jax.tree.structure(ref_grads):
        raise ValueError("gradient_agreement: grads and ref_grads have different structures.")
    arrays = [
        (jax.tree_util.keystr(path), np.asarray(a, np.float64), np.asarray(b, np.float64))
        for (path, a), b in zip(flat, ref_flat)
    ]
    tiny = np.finfo(np.float64).tiny
    norms = [np.linalg.norm(b) for _, _, b in arrays]
    largest = max(norms, default=0.0)
    leaves, dot, sq_a, sq_b, sq_d = {}, 0.0, 0.0, 0.0, 0.0
    for (name, a, b), nb in zip(arrays, norms):
        na, d = np.linalg.norm(a), np.linalg.norm(a - b)
        ab = float(np.vdot(a, b))
        leaves[name] = {
            "rel": float(d / max(nb, tiny)),
            "cos": _cosine(ab, na * nb, tiny),
            "norm": float(nb),
            "significant": bool(nb >= min_relative_norm * largest and nb > 0),
        }
        dot, sq_a, sq_b, sq_d = dot + ab, sq_a + na**2, sq_b + nb**2, sq_d + d**2
    significant = [v["rel"] for v in leaves.values() if v["significant"]]
    return {
        "rel": float(np.sqrt(sq_d) / max(np.sqrt(sq_b), tiny)),
        "cos": _cosine(dot, np.sqrt(sq_a * sq_b), tiny),
        "max_leaf_rel": max(significant, default=0.0),
        "leaves": leaves,
    }


# --------------------------------------------------------------------------------------------
# Monitor
# --------------------------------------------------------------------------------------------


class DriftMonitor:
    """Checks, during training, how far the rebuilt activations drift from the stored ones.

    Every call of `check` runs `reconstruction_error` on the current weights and a batch (one
    compiled function, built on the first call and reused), returns flat metrics and warns with
    a `DriftWarning` when a stage's ``max_rel`` passes ``threshold``.

    Args:
      graphdef: the RevNet's graphdef (from `revjax.functional`).
      threshold: largest acceptable ``max_rel`` (reconstruction error relative to the
        activation scale). Float32 models measure ~1e-7 to 1e-5 (bfloat16 carries ~1e-2);
        1e-3 in float32 means the rebuild is broken (e.g. exploding weights or a non-finite
        activation), not rounding.

    Example::

        monitor = DriftMonitor(graphdef, threshold=1e-3)
        metrics = monitor.check(state.params, state.batch_stats, batch["image"])
        # {"stage0/max_rel": 2e-7, ..., "max_rel": 4e-7, "mismatches": 8190}
        # A fixed-point model: {"stage0/max_rel": 0.0, ..., "mismatches": 0}
    """

    def __init__(self, graphdef: nnx.GraphDef, threshold: float = 1e-3):
        if not threshold > 0:
            raise ValueError(f"DriftMonitor threshold must be positive, got {threshold!r}.")
        self.graphdef = graphdef
        self.threshold = float(threshold)
        # Shares `reconstruction_error`'s compiled function (cached per graphdef and shapes).
        self._fn = functools.partial(_reconstruction_jit, graphdef)

    def check(self, params: nnx.State, batch_stats: nnx.State, images: Array) -> dict[str, float]:
        """Measures the drift on ``images``; returns ``{"stage<i>/<stat>": value, "max_rel",
        "mismatches"}`` (``mismatches``: rebuilt elements whose bits differ, all stages).

        Warns with `DriftWarning` when any stage's ``max_rel`` exceeds the threshold or is not
        finite.
        """
        summary = _summarise(jax.device_get(self._fn(params, batch_stats, images)))
        metrics: dict[str, float] = {}
        for stage, stats in summary.items():
            for key in ("max_abs", "max_rel", "rel", "channel_rel", "mismatches"):
                metrics[f"{stage}/{key}"] = stats[key]
        worst = max(summary.items(), key=lambda kv: _nan_last(kv[1]["max_rel"]), default=None)
        metrics["max_rel"] = worst[1]["max_rel"] if worst else 0.0
        metrics["mismatches"] = sum(stats["mismatches"] for stats in summary.values())
        if worst is not None and not worst[1]["max_rel"] <= self.threshold:
            stage, stats = worst
            unit = int(np.nanargmax(np.nan_to_num(stats["per_unit"]["max_rel"], nan=np.inf)))
            warnings.warn(
                f"Reversible {stage}: rebuilt activations differ from the stored ones by "
                f"{stats['max_rel']:.3g} (relative, worst at reversible unit {unit}), above the "
                f"drift threshold {self.threshold:g}. Gradients of the memory-saving backward "
                "are then inaccurate. Check for exploding weights or non-finite activations; "
                "arithmetic='fixed' rebuilds exactly, RevNet(exact_every=k) bounds the "
                "accumulated error, carry_dtype=jnp.float32 helps half-precision models, "
                "memory_saving=False avoids the rebuild.",
                DriftWarning,
                stacklevel=2,
            )
        return metrics


def _nan_last(value: float) -> float:
    # NaN is the worst possible drift: sort it above every number.
    return math.inf if math.isnan(value) else value
