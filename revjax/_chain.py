"""`reversible_chain`: invertible segments (sequences, shape-changing shortcut units) joined
into one custom VJP that stores only the chain's output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from revjax._carry import (
    DEFAULT_FRAC_BITS,
    check_arithmetic,
    check_rebuild_mode,
    in_range,
    make_carry,
    max_abs,
    quantize,
)
from revjax._coupling import Coupling, additive_coupling, cast_like, get_coupling
from revjax._sequence import (
    SequenceSetting,
    check_exact_every,
    exact_units,
    scan_forward,
    sequence_backward,
)
from revjax._units import (
    Branch,
    after,
    checksum,
    default_unroll,
    isolated_branch,
    isolated_pullback,
    isolates,
    isolation_keeps_pullback,
    rebuilt_output,
    vjp_inexact,
)

Array = jax.Array
PyTree = Any


class ChainSegment(NamedTuple):
    """One invertible piece of a `reversible_chain`, mapping halves to halves.

    Build them with `sequence_segment` (stacked reversible units) and `shortcut_unit_segment`
    (one unit whose halves change shape through an injective linear shortcut). A segment works
    on carries in the chain's arithmetic ``arith`` (`make_carry`: floats, or int32 fixed
    point).

    Attributes:
      num_units: how many units the segment counts for ``exact_every`` placement.
      forward: ``(params, c1, c2, stored_units, k, arith, peak) -> ((d1, d2), aux, kept,
        peak)``. ``stored_units`` is ``(first, count)`` or None: keep the exact input carries
        of local units ``first, first + k, ...``. ``kept``: ``(stored, checks)``, the kept
        inputs (None when nothing is kept) and the units' rebuild checks (int32
        ``[units, 4]``, see `revjax._units.unit_forward`; None for float carries). ``peak``: a
        float32 scalar to update with the largest carry / F / G magnitude, or None.
      backward: ``(params, kept, d1, d2, dy1, dy2, stored_units, k, arith) -> ((c1, c2),
        (dx1, dx2), dparams, mismatches)``: rebuilds the segment's input carries from its
        output carries while pulling the cotangent back (using the stored inputs in place of
        rebuilt ones), and counts the units whose rebuild differs from the checks.
    """

    num_units: int
    forward: Callable
    backward: Callable


def sequence_segment(
    f: Callable,
    g: Callable,
    num_units: int,
    *,
    coupling: str | Coupling = "additive",
    has_aux: bool = False,
    unroll: int | bool | None = None,
) -> ChainSegment:
    """`reversible_sequence` as a `reversible_chain` segment; params are ``(f_params, g_params)``.

    F and G are as in `reversible_sequence` (no keys, no context).
    """
    cpl = get_coupling(coupling)
    unroll = default_unroll(num_units) if unroll is None else unroll
    f_branch, g_branch = Branch(f, has_aux, False), Branch(g, has_aux, False)

    def setting(arith, k):
        check_arithmetic("fixed" if arith.fixed else "float", DEFAULT_FRAC_BITS, cpl)
        return SequenceSetting(cpl, f_branch, g_branch, unroll, arith, k)

    def forward(params, c1, c2, stored_units, k, arith, peak=None):
        fp, gp = params
        d, aux, stored, peak, checks = scan_forward(
            setting(arith, k), fp, gp, c1, c2, None, None, peak, stored_units=stored_units
        )
        return d, aux, (stored, checks), peak

    def backward(params, kept, d1, d2, dy1, dy2, stored_units, k, arith):
        fp, gp = params
        stored, checks = kept
        c, dx, (dfp, dgp, _), bad = sequence_backward(
            setting(arith, k), fp, gp, d1, d2, None, None, stored, dy1, dy2, stored_units, checks
        )
        return c, dx, (dfp, dgp), bad

    return ChainSegment(num_units, forward, backward)


def shortcut_unit_segment(
    f: Callable,
    g: Callable,
    shortcut: Callable[[Array], Array],
    shortcut_inverse: Callable[[Array], Array],
    *,
    has_aux: bool = False,
) -> ChainSegment:
    """One additive unit whose halves change shape: ``y1 = P(x1) + F(x2)``, ``y2 = P(x2) + G(y1)``.

    ``P`` (``shortcut``) must be linear and injective with the exact left inverse
    ``shortcut_inverse`` (e.g. space-to-depth plus zero channels, as in i-RevNet), so that
    ``x2 = P^-1(y2 - G(y1))`` and ``x1 = P^-1(y1 - F(x2))``. F maps ``x2`` to ``P(x1)``'s
    shape (it carries the stride), G maps ``y1`` to ``y2``'s. Params are ``(f_params,
    g_params)``, not stacked. With fixed-point carries ``P`` and ``P^-1`` must only move and
    pad elements (no arithmetic), so that they act on the integers exactly.
    """
    f_branch, g_branch = Branch(f, has_aux, False), Branch(g, has_aux, False)

    def float_combine(x, h):
        p = shortcut(x)
        return p + cast_like(h, p)

    def apply(arith, branch, params, c):
        # The branch's output for the combine, its aux and max |h|: with rebuild="isolated"
        # rounded to the grid (int32), evaluated in isolation as the backward's rebuild does.
        if isolates(arith):
            return isolated_branch(arith, branch, params, c, None, None)
        h, aux = branch(params, arith.view(c), None)
        return h, aux, max_abs(h)

    def combine(arith, c, out):
        p = arith.linear(shortcut, c)
        return p + out if isolates(arith) else arith.combine(additive_coupling, p, out)

    def forward(params, c1, c2, stored_units, k, arith, peak=None):
        fp, gp = params
        h_f, aux_f, m_f = apply(arith, f_branch, fp, c2)
        d1 = combine(arith, c1, h_f)
        h_g, aux_g, m_g = apply(arith, g_branch, gp, d1)
        d2 = combine(arith, c2, h_g)
        if peak is not None:
            parts = (arith.magnitude(c1), arith.magnitude(c2), m_f, m_g)
            peak = functools.reduce(jnp.maximum, parts, peak)
        keep = stored_units is not None and stored_units[1]
        checks = None
        if arith.fixed and not arith.traced:
            q = [h if isolates(arith) else quantize(h, arith.frac_bits) for h in (h_f, h_g)]
            checks = jnp.concatenate([checksum(a) for a in q])[None]  # [1, 4]
        return (d1, d2), (aux_f, aux_g), (((c1, c2) if keep else None), checks), peak

    def branch_vjp(arith, branch, params, c):
        # (h, pullback of (params, view of c), q or None), as `sequence_backward`'s branch: on
        # CPU with rebuild="isolated", the isolated evaluation's own residuals, rounded output
        # included; on GPU / TPU the isolated rebuild first, then the pullback's recomputation.
        if isolates(arith) and isolation_keeps_pullback():
            q, pullback, h = isolated_pullback(arith, branch, params, c, None, None)
            return h, lambda ct: pullback(ct)[:2], q
        q = None
        if isolates(arith):
            q = rebuilt_output(arith, branch, params, c, None, None)
            # The pullback's recomputation starts once the isolated evaluation is done, so
            # their intermediates are never alive at once.
            q, params, c = lax.optimization_barrier((q, params, c))
        h, pullback = vjp_inexact(lambda p, a: branch(p, a, None)[0], params, arith.view(c))
        if arith.fixed and q is None:
            q = quantize(h, arith.frac_bits)
        return h, pullback, q

    def rebuilt(arith, d, h, q):
        # The segment's input half from output d: P^-1(d (-) q(branch(c))).
        r = d - q if q is not None else arith.uncombine(additive_coupling, d, h)
        return shortcut_inverse(r)

    def backward(params, kept, d1, d2, dy1, dy2, stored_units, k, arith):
        fp, gp = params
        stored, checks = kept
        d1, d2 = after(d1, d2, dy1, dy2)
        h_g, g_vjp, q_g = branch_vjp(arith, g_branch, gp, d1)
        c2 = rebuilt(arith, d2, h_g, q_g)
        if stored is not None:
            c2 = stored[1]
        dx2, dh_g = jax.vjp(float_combine, arith.view(c2), h_g)[1](dy2)
        dgp, dy1_from_g = g_vjp(dh_g)
        dy1 = dy1 + dy1_from_g
        # F's recomputation may not start before G's pullback is done: left free, XLA:GPU
        # overlaps them and holds both branches' full-size buffers at once. A barrier moves no
        # data and computes nothing. dx2 stays out of it: forced early, it would live through
        # F's pullback.
        c2, dy1 = lax.optimization_barrier((c2, dy1))
        h_f, f_vjp, q_f = branch_vjp(arith, f_branch, fp, c2)
        c1 = rebuilt(arith, d1, h_f, q_f)
        if stored is not None:
            c1 = stored[0]
        dx1, dh_f = jax.vjp(float_combine, arith.view(c1), h_f)[1](dy1)
        dfp, dx2_from_f = f_vjp(dh_f)
        bad = jnp.zeros((), jnp.int32)
        if checks is not None:
            mine = jnp.concatenate([checksum(q_f), checksum(q_g)])
            bad = jnp.any(mine != checks[0]).astype(jnp.int32)
        return (c1, c2), (dx1, dx2 + dx2_from_f), (dfp, dgp), bad

    return ChainSegment(1, forward, backward)


def chain_exact_units(segments: Sequence[ChainSegment], k: int | None) -> list:
    """`exact_units` over a whole chain, per segment: ``(first, count)`` local units or None.

    The units are numbered across the segments (N in all); the chain stores the inputs of
    units ``N-k, N-2k, ... > 0``, wherever they fall, so that no rebuilt chain, across segment
    boundaries too, is longer than k units.
    """
    total = sum(s.num_units for s in segments)
    wanted = set(exact_units(total, k))
    plans, offset = [], 0
    for seg in segments:
        local = [u - offset for u in range(offset, offset + seg.num_units) if u in wanted]
        plans.append((local[0], len(local)) if local else None)
        offset += seg.num_units
    return plans


def reversible_chain(
    segments: Sequence[ChainSegment],
    params: Sequence[PyTree],
    x1: Array,
    x2: Array,
    *,
    memory_saving: bool = True,
    exact_every: int | None = None,
    arithmetic: str = "float",
    frac_bits: int = DEFAULT_FRAC_BITS,
    return_peak: bool = False,
    rebuild: str = "isolated",
    rebuild_probes: Sequence[Array] | None = None,
) -> tuple[tuple[Array, Array], tuple]:
    """Applies invertible segments in turn as one custom VJP that stores only the final output.

    Where `reversible_sequence` stores each sequence's output, a chain rebuilds every segment's
    output from the next segment's input in the backward pass, so a whole network of invertible
    pieces (i-RevNet: stages joined by invertible downsampling) stores one pair of halves,
    whatever its depth and number of stages.

    Args:
      segments: `ChainSegment` s, applied in order; each maps the previous one's halves.
      params: one parameter pytree per segment.
      x1: first half of the input.
      x2: second half of the input.
      memory_saving: False runs the same segments through plain autodiff (the reference).
      exact_every: bound every rebuilt chain at k units, counting units across segments: the
        inputs of units ``N-k, N-2k, ... > 0`` of the N units are stored (`chain_exact_units`).
      arithmetic: ``"float"`` or ``"fixed"``: the halves are carried through every segment as
        int32 fixed point, so the whole chain is rebuilt bit for bit (see
        `reversible_sequence`; the shortcuts move and pad the integers).
      frac_bits: fraction bits of the fixed-point carries.
      return_peak: also return one float32 scalar per segment: the largest magnitude of its
        input carries and F/G outputs.
      rebuild: with fixed point, ``"isolated"`` or ``"pullback"`` (see `reversible_sequence`).
      rebuild_probes: one float32 scalar per segment (values unused), or None: the cotangent
        of each is the number of that segment's units whose rebuild differed from the forward
        (fixed point; always 0 for floats).

    Returns:
      ``((y1, y2), aux)``, ``aux`` holding each segment's F/G aux outputs (not differentiated);
      with ``return_peak``, ``(that, peaks)``.
    """
    segments, params = tuple(segments), tuple(params)
    if len(segments) != len(params):
        raise ValueError(
            f"reversible_chain needs one parameter pytree per segment: got {len(segments)} "
            f"segments and {len(params)} parameter pytrees."
        )
    check_exact_every(exact_every)
    check_arithmetic(arithmetic, frac_bits)
    check_rebuild_mode(rebuild)
    if rebuild_probes is None:
        rebuild_probes = tuple(jnp.zeros((), jnp.float32) for _ in segments)
    rebuild_probes = tuple(rebuild_probes)
    if len(rebuild_probes) != len(segments):
        raise ValueError(
            f"reversible_chain needs one rebuild probe per segment: got {len(segments)} "
            f"segments and {len(rebuild_probes)} probes."
        )
    plans = chain_exact_units(segments, exact_every if memory_saving else None)
    arith = make_carry(
        arithmetic, frac_bits, jnp.result_type(x1), traced=not memory_saving, rebuild=rebuild
    )
    track = return_peak or arith.fixed

    def forward(params, x1, x2, keep, arith=arith):
        auxes, stored, peaks = [], [], []
        c1, c2 = arith.enter(x1), arith.enter(x2)
        peak = max_abs((x1, x2)) if track else None
        for seg, p, plan in zip(segments, params, plans, strict=True):
            seg_peak = jnp.zeros((), jnp.float32) if track else None
            (c1, c2), aux, s, seg_peak = seg.forward(
                p, c1, c2, plan if keep else None, exact_every, arith, seg_peak
            )
            auxes.append(aux)
            stored.append(s)
            peaks.append(seg_peak)
            peak = jnp.maximum(peak, seg_peak) if track else None
        y1, y2 = in_range(arith, peak, arith.leave(c1), arith.leave(c2))
        return ((y1, y2), tuple(auxes), tuple(peaks)), (c1, c2, tuple(stored))

    def finish(out):
        (y1, y2), aux, peaks = out
        return (((y1, y2), aux), peaks) if return_peak else ((y1, y2), aux)

    if not memory_saving:
        return finish(forward(params, x1, x2, False)[0])

    # Without differentiation nothing is rebuilt: F and G run inline, not isolated.
    inline = arith._replace(isolate=False) if isolates(arith) else arith

    @jax.custom_vjp
    def run(params, x1, x2, probes):
        return forward(params, x1, x2, False, inline)[0]

    def run_fwd(params, x1, x2, probes):
        out, (c1, c2, kept) = forward(params, x1, x2, True)
        # The residuals: parameters, the chain's output carries, the inputs
        # `chain_exact_units` names and four int32 checks per unit. No segment's output: each
        # is rebuilt from the next one.
        return out, (params, c1, c2, kept)

    def run_bwd(residuals, cotangents):
        params, c1, c2, kept = residuals
        (dy1, dy2), _, _ = cotangents  # aux and peaks are not differentiated
        dparams, counts = [None] * len(segments), [None] * len(segments)
        for j in reversed(range(len(segments))):
            (c1, c2), (dy1, dy2), dparams[j], bad = segments[j].backward(
                params[j], kept[j], c1, c2, dy1, dy2, plans[j], exact_every, arith
            )
            counts[j] = bad.astype(jnp.float32)
        return tuple(dparams), dy1, dy2, tuple(counts)

    run.defvjp(run_fwd, run_bwd)
    return finish(run(params, x1, x2, rebuild_probes))
