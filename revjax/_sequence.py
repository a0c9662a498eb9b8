"""`reversible_sequence`: n stacked reversible units as one custom VJP over ``lax.scan``.

The forward scan (`scan_forward`) stores only the sequence's output; the backward
(`sequence_backward`) rebuilds each unit's input from its output while pulling the cotangent
back. ``exact_every`` stores the exact inputs of some units (`exact_units`) to bound the chain
of rebuilt units. Also `inverse_sequence` (the rebuild alone) and `relative_error`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from revjax._carry import (
    DEFAULT_FRAC_BITS,
    check_arithmetic,
    check_carry_dtype,
    check_rebuild_mode,
    in_range,
    make_carry,
    max_abs,
    output_carries,
    output_residual,
    quantize,
)
from revjax._coupling import Coupling, get_coupling
from revjax._units import (
    Branch,
    UnitParams,
    add_cotangents,
    after,
    check_context,
    checksum,
    count_units,
    default_unroll,
    differentiable,
    isolated_pullback,
    isolates,
    isolation_keeps_pullback,
    rebuilt_output,
    slices_inside,
    split_unit_key,
    tie_to_cotangent,
    unit_forward,
    unit_inverse,
    unit_params,
    unit_slice,
    vjp_inexact,
)

Array = jax.Array
PyTree = Any


class SequenceSetting(NamedTuple):
    """The static setting of one sequence's forward and backward scans.

    Attributes:
      coupling: the `Coupling`.
      f: F as a normalised ``Branch``.
      g: G as a normalised ``Branch``.
      unroll: ``lax.scan`` unroll.
      arith: the carry arithmetic (`make_carry`).
      exact_every: k of ``exact_every`` (None: no stored inputs).
      track_peak: also compute the largest carry / F / G magnitude (always on for fixed point).
    """

    coupling: Coupling
    f: Any
    g: Any
    unroll: int | bool
    arith: Any
    exact_every: int | None = None
    track_peak: bool = False


def reversible_sequence(
    f: Callable,
    g: Callable,
    f_params: PyTree,
    g_params: PyTree,
    x1: Array,
    x2: Array,
    *,
    coupling: str | Coupling = "additive",
    has_aux: bool = False,
    keys: Array | None = None,
    memory_saving: bool = True,
    unroll: int | bool | None = None,
    remat: bool = False,
    exact_every: int | None = None,
    context: PyTree = None,
    arithmetic: str = "float",
    frac_bits: int = DEFAULT_FRAC_BITS,
    return_peak: bool = False,
    rebuild: str = "isolated",
    rebuild_probe: Array | None = None,
):
    """Applies n reversible units in sequence, storing no per-unit activation.

    Unit i computes ``y1 = x1 (+) F(x2)``, ``y2 = x2 (+) G(y1)`` with the i-th slice of the
    stacked parameters (``(+)``: ``+`` for the additive coupling, ``x * exp(tanh(s)) + t`` for
    the affine one, F and G then returning ``(s, t)``). With ``memory_saving=True`` the whole
    sequence is one `jax.custom_vjp` that saves only its output (and parameters, keys, context):
    the backward walks the units in reverse, rebuilds each input from its output and pulls the
    cotangent back through F and G, so activation memory does not grow with n.

    ``arithmetic="fixed"`` (additive only) carries the halves as int32 fixed point and rounds every
    F/G output to the grid before an integer addition, so the rebuild is exact: with
    ``rebuild="isolated"`` F and G are evaluated for the rebuild exactly as in the forward (bit for
    bit, whatever XLA does around them): on CPU that evaluation also gives the pullback's residuals;
    on GPU and TPU the pullback evaluates F and G once more per unit. The backward also counts the
    units whose rebuilt F/G outputs differ from the forward's (checksums, four int32 per unit),
    returned as the gradient of ``rebuild_probe``. Gradients equal plain autodiff's only up to
    rounding: they are computed by a different program. See the exact-arithmetic guide for what
    holds where and for measurements.

    Args:
      f: ``(params, x2) -> h``; with ``keys`` it also takes the unit's key, with ``context``
        the context: ``(params, x2, key, context)``. Returns ``(h, aux)`` when ``has_aux``.
      g: the same for the second half, ``(params, y1) -> h``.
      f_params: pytree whose leaves all have a leading axis of length n (non-inexact leaves,
        e.g. RNG counters, are sliced but get no gradient).
      g_params: the same for G.
      x1: first half of the input.
      x2: second half of the input.
      coupling: ``"additive"``, ``"affine"`` or a `Coupling`.
      has_aux: F and G return ``(h, aux)``; the forward's aux (e.g. BatchNorm statistics) are
        returned stacked over units, not differentiated; the backward discards its own.
      keys: optional PRNG keys, one per unit (leading axis n); unit i splits its key for F and
        G, and the backward reuses them, so dropout gives plain autodiff's gradients.
      memory_saving: False runs plain autodiff through the same scan (the reference).
      unroll: ``lax.scan`` unroll; ``None``: `default_unroll` (full on CPU, where XLA:CPU runs
        conv gradients in a rolled scan many times slower, jax-ml/jax#12868; rolled on GPU/TPU).
      remat: only with ``memory_saving=False``: `jax.checkpoint` each unit (the usual
        gradient-checkpointing baseline).
      exact_every: with memory saving, store the exact inputs of units ``n-k, n-2k, ...``
        (`exact_units`) so no input is rebuilt through more than k units (float arithmetic's
        bound on drift; fixed point needs none). ``None`` stores none.
      context: side inputs shared by every unit (a pytree of arrays), passed to F and G last;
        inexact leaves get gradients summed over the units.
      arithmetic: ``"float"`` (the paper's rebuild, exact up to rounding) or ``"fixed"``.
      frac_bits: fraction bits of the fixed-point carries (grid ``2**-frac_bits``, range
        ``carry_limit(frac_bits)``).
      return_peak: also return the largest magnitude of any carry and F/G output (float32;
        NaN if any was NaN). Fixed-point outputs are NaN once it reaches ``carry_limit``.
      rebuild: with fixed point, ``"isolated"`` (default, exact by construction) or
        ``"pullback"``: the rebuild reuses the pullback's recomputation of F and G (on GPU
        and TPU one evaluation fewer per unit), exact only where XLA compiles it as in the
        forward.
      rebuild_probe: optional float scalar (value unused) whose gradient is the number of
        units whose fixed-point rebuild differed from the forward (0 for floats).

    Returns:
      ``(y1, y2)``, or ``((y1, y2), (f_aux, g_aux))`` when ``has_aux``; with ``return_peak``,
      ``(that, peak)``.

    Raises:
      ValueError: unknown coupling, arithmetic or rebuild, fixed point with the affine
        coupling, params without a common leading axis, a number of keys different from n, a
        context that is not a pytree of arrays, or F/G outputs that don't fit the halves.
    """
    cpl = get_coupling(coupling)
    check_arithmetic(arithmetic, frac_bits, cpl)
    check_rebuild_mode(rebuild)
    n = count_units(f_params, g_params)
    if context is not None:
        check_context(context)
    if rebuild_probe is not None:
        floating = jnp.issubdtype(jnp.result_type(rebuild_probe), jnp.floating)
        if jnp.shape(rebuild_probe) or not floating:
            raise ValueError(
                "rebuild_probe must be a floating-point scalar (its value is unused; its "
                "gradient is the count of mismatched units), got "
                f"{jnp.result_type(rebuild_probe)} of shape {jnp.shape(rebuild_probe)}. Use "
                "jnp.zeros((), jnp.float32)."
            )
    if keys is not None:
        n_keys = jnp.shape(keys)[0] if jnp.ndim(keys) else None
        if n_keys != n:
            raise ValueError(
                f"keys must hold one PRNG key per unit: expected a leading axis of {n}, got "
                f"shape {jnp.shape(keys)}. Use jax.random.split(key, {n})."
            )
    if arithmetic == "fixed" and jnp.result_type(x1) != jnp.result_type(x2):
        raise ValueError(
            "arithmetic='fixed' needs both halves in one dtype, got "
            f"{jnp.result_type(x1)} and {jnp.result_type(x2)}: cast them to the carry dtype."
        )
    check_carry_dtype(arithmetic, jnp.result_type(x1))
    if unroll is None:
        unroll = default_unroll(n)
    f_branch = Branch(f, has_aux, keys is not None, context is not None)
    g_branch = Branch(g, has_aux, keys is not None, context is not None)
    _check_shapes(cpl, f_branch, g_branch, f_params, g_params, x1, x2, keys, context)

    if memory_saving and remat:
        raise ValueError(
            "remat=True checkpoints units of the plain-autodiff path; with memory_saving=True "
            "nothing is stored to begin with. Pass memory_saving=False with remat=True."
        )
    check_exact_every(exact_every)
    arith = make_carry(
        arithmetic, frac_bits, jnp.result_type(x1), traced=not memory_saving, rebuild=rebuild
    )
    setting = SequenceSetting(
        cpl,
        f_branch,
        g_branch,
        unroll,
        arith,
        exact_every if memory_saving else None,
        track_peak=return_peak or arith.fixed,
    )
    if memory_saving:
        run = _make_memory_saving(setting)
    else:
        run = lambda fp, gp, a, b, k, c, _: _plain_sequence(setting, fp, gp, a, b, k, c, remat)
    probe = jnp.zeros((), jnp.float32) if rebuild_probe is None else rebuild_probe
    probe = jnp.asarray(probe).astype(jnp.float32)  # the count's dtype (float64 under x64)
    (y1, y2), aux, peak = run(f_params, g_params, x1, x2, keys, context, probe)
    out = ((y1, y2), aux) if has_aux else (y1, y2)
    return (out, peak) if return_peak else out


def _check_shapes(cpl, f_branch, g_branch, f_params, g_params, x1, x2, keys, context) -> None:
    """Traces one unit abstractly and checks that F and G map the halves onto each other."""
    fp0, gp0 = unit_slice(f_params, 0), unit_slice(g_params, 0)
    kf, kg = split_unit_key(None if keys is None else keys[0])

    def expect(branch, params, x, key, like, name, half):
        h = jax.eval_shape(lambda p, a, k, c: branch(p, a, k, c)[0], params, x, key, context)
        parts = h if cpl.name == "affine" else (h,)
        if cpl.name == "affine" and not (isinstance(h, tuple | list) and len(h) == 2):
            raise ValueError(
                f"The affine coupling needs {name} to return a pair (log_scale, shift); got "
                f"{jax.tree.structure(h)}."
            )
        for part in parts:
            if not hasattr(part, "shape") or tuple(part.shape) != tuple(jnp.shape(like)):
                got = getattr(part, "shape", type(part).__name__)
                raise ValueError(
                    f"{name} must map its input to the shape of {half} {tuple(jnp.shape(like))} "
                    f"for the {cpl.name} coupling, but returned {got}. Reversible units need "
                    "halves of one shape: check the split and that F/G keep spatial size and "
                    "channel count (no stride inside a reversible unit)."
                )

    expect(f_branch, fp0, x2, kf, x1, "F", "x1")
    expect(g_branch, gp0, x1, kg, x2, "G", "x2")


def _input_peak(setting: SequenceSetting, x1: Array, x2: Array) -> Array | None:
    # Measured on the float inputs: a NaN input must not vanish into an integer carry.
    return max_abs((x1, x2)) if setting.track_peak else None


def scan_forward(
    setting, fp, gp, c1, c2, keys, context=None, peak=None, *, stored_units=None, remat=False
):
    """The forward sequence on carries as one ``lax.scan`` of `unit_forward`.

    Also the plain-autodiff path (with ``remat``, each unit under `jax.checkpoint`).
    ``stored_units``: ``(first, count)`` to also keep the exact input carries of units
    ``first, first + k, ...`` (k = ``setting.exact_every``) in a carried buffer of ``count``
    activations per half, updated in place; see `exact_range`.

    Returns:
      ``((c1, c2), aux, stored, peak, checks)``; ``stored`` is ``(buf1, buf2)`` or None,
      ``checks`` each unit's rebuild check (int32 ``[n, 4]``, see `unit_forward`) or None.
    """
    n = count_units(fp, gp)
    s = setting
    count = 0 if stored_units is None else stored_units[1]
    first, k = (stored_units[0], s.exact_every) if count else (0, 1)
    bufs = (
        (jnp.zeros((count, *c1.shape), c1.dtype), jnp.zeros((count, *c2.shape), c2.dtype))
        if count
        else None
    )  # [count, *half.shape] each
    # Isolated evaluations behind barriers slice their unit's parameters themselves.
    lazy = slices_inside(s.arith)

    def body(carry, xs):
        (a1, a2), bufs, peak = carry
        i, p_f, p_g, key = xs
        if lazy:
            p_f, p_g = UnitParams(fp, i), UnitParams(gp, i)
        if bufs is not None:
            keep, slot = exact_slot(i, first, count, k)
            bufs = tuple(
                lax.dynamic_update_index_in_dim(b, jnp.where(keep, a, b[slot]), slot, 0)
                for b, a in zip(bufs, (a1, a2), strict=True)
            )
        (b1, b2), aux, peak, check = unit_forward(
            s.arith, s.coupling, s.f, s.g, p_f, p_g, key, context, a1, a2, peak
        )
        return ((b1, b2), bufs, peak), (aux, check)

    if remat:
        body = jax.checkpoint(body)
    xs = (jnp.arange(n), None, None, keys) if lazy else (jnp.arange(n), fp, gp, keys)
    ((y1, y2), bufs, peak), (aux, checks) = lax.scan(
        body, ((c1, c2), bufs, peak), xs, unroll=s.unroll
    )
    return (y1, y2), aux, bufs, peak, checks


def _plain_sequence(setting, fp, gp, x1, x2, keys, context, remat=False):
    """Plain autodiff through the forward scan: ``((y1, y2), aux, peak)`` on float halves."""
    arith = setting.arith
    peak = _input_peak(setting, x1, x2)
    (c1, c2), aux, _, peak, _ = scan_forward(
        setting, fp, gp, arith.enter(x1), arith.enter(x2), keys, context, peak, remat=remat
    )
    y1, y2 = in_range(arith, peak, arith.leave(c1), arith.leave(c2))
    return (y1, y2), aux, peak


def check_exact_every(exact_every: Any, owner: str = "") -> None:
    """Raises a ValueError unless ``exact_every`` is a positive int or None (``owner``: the
    class named at the start of the message, e.g. ``"RevNet"``)."""
    if exact_every is not None and (
        isinstance(exact_every, bool) or not isinstance(exact_every, int) or exact_every < 1
    ):
        prefix = f"{owner}: " if owner else ""
        raise ValueError(
            f"{prefix}exact_every must be a positive int or None, got {exact_every!r}."
        )


def exact_units(n: int, k: int | None) -> tuple[int, ...]:
    """The units whose exact input ``exact_every=k`` stores in a sequence of n units.

    Units ``n-k, n-2k, ...`` down to the first one above 0, in increasing order: rebuilding
    starts from the exact sequence output, so each stored input ends a chain of k rebuilt units,
    and unit 0 (whose input is at most k units from the next stored one) is never needed.
    Empty when ``n <= k`` or ``k`` is None.
    """
    if k is None:
        return ()
    return tuple(range(n - k, 0, -k))[::-1]


def exact_range(n: int, k: int) -> tuple[int, int]:
    """`exact_units(n, k)` as ``(first, count)``: units ``first, first + k, ...``."""
    count = (n - 1) // k
    return n - count * k, count


def exact_slot(i: Array, first: int, count: int, k: int) -> tuple[Array, Array]:
    """For unit ``i`` (traced): ``(is unit i's input stored, its slot in the buffer)``.

    The stored units are ``first, first + k, ...`` (``count`` of them; see `exact_range`).
    """
    keep = (i >= first) & ((i - first) % k == 0) & (i < first + count * k)
    slot = jnp.clip((i - first) // k, 0, max(count - 1, 0))
    return keep, slot


def sequence_backward(
    setting, fp, gp, y1, y2, keys, context, stored, dy1, dy2, stored_units=None, checks=None
):
    """The memory-saving backward of a sequence: rebuilds its input while pulling back.

    Walks the units in reverse. Per unit, G(y1) and F(x2) are rebuilt and differentiated: ``x2 = y2
    (-) G(y1)``, ``x1 = y1 (-) F(x2)``. With ``rebuild="isolated"`` fixed-point carries the rebuild
    evaluates each branch through `isolated_branch`, as the forward did (the same computation, so
    the same bits): on CPU the pullback uses that evaluation's residuals (`isolated_pullback`), on
    GPU and TPU a `jax.vjp` of its own; otherwise the rebuild takes the `jax.vjp`'s primal output
    (exact only where XLA compiles it as in the forward). ``y1, y2`` are carries in
    ``setting.arith`` (int32 for fixed point); F and G are differentiated at the carries' float
    view, and the combine rule at its float form (rounding's gradient is the identity). ``stored``:
    the exact input carries kept by `scan_forward` (``(buf1, buf2)``) or None; ``stored_units`` as
    there. ``checks``: the forward's per-unit checks (`scan_forward`), compared with the rebuild's.

    Returns:
      ``((x1, x2), (dx1, dx2), (df_params, dg_params, dcontext), mismatches)``: the rebuilt
      input carries, the cotangent of their float view, the cotangents of the parameters and
      side inputs, and the number of units whose rebuilt F/G outputs differ from the
      forward's (int32; 0 without ``checks``).
    """
    s, arith, cpl = setting, setting.arith, setting.coupling
    n = count_units(fp, gp)
    k = s.exact_every
    if stored is not None:
        first, count = exact_range(n, k) if stored_units is None else stored_units
    # Cotangent of the side inputs, summed over units: zeros for inexact leaves, None else.
    dcontext = jax.tree.map(lambda c: jnp.zeros_like(c) if differentiable(c) else None, context)

    def exact(i, rebuilt, half):
        # With exact_every=k, the inputs of units n-k, n-2k, ... were stored: use them instead
        # of the rebuilt ones, so no chain of rebuilt units is longer than k.
        if stored is None:
            return rebuilt
        keep, slot = exact_slot(i, first, count, k)
        return jnp.where(keep, stored[half][slot], rebuilt)

    def branch(fn, params, c, key):
        # The branch's pullback (non-inexact leaves of parameters and context get None), its
        # float output, and for fixed point the rounded output that rebuilds the carry.
        q = None
        if isolates(arith) and isolation_keeps_pullback():
            # One isolated evaluation rebuilds and gives the pullback's residuals (CPU).
            q, pullback, h = isolated_pullback(arith, fn, params, c, key, context)
            return h, pullback, q
        if isolates(arith):
            q = rebuilt_output(arith, fn, params, c, key, context)
            # The pullback's recomputation starts once the isolated evaluation is done, so
            # their intermediates are never alive at once (with `UnitParams`, nor is its
            # slice of the parameters).
            q, params, c = lax.optimization_barrier((q, params, c))
        h, pullback = vjp_inexact(
            lambda p, a, ctx: fn(p, a, key, ctx)[0], unit_params(params), arith.view(c), context
        )
        if arith.fixed and q is None:
            q = quantize(h, arith.frac_bits)
        return h, pullback, q

    def rebuild(c, h, q):
        return c - q if q is not None else arith.uncombine(cpl, c, h)

    lazy = slices_inside(arith)

    def body(carry, xs):
        b1, b2, db1, db2, dctx, bad = carry
        i, p_f, p_g, key, check = xs
        if lazy:
            p_f, p_g = UnitParams(fp, i), UnitParams(gp, i)
        kf, kg = split_unit_key(key)
        b1, b2 = after(b1, b2, db1, db2)
        # G(y1): rebuilds x2, pulls back the cotangent of y2.
        h_g, g_vjp, q_g = branch(s.g, p_g, b1, kg)
        a2 = exact(i, rebuild(b2, h_g, q_g), 1)
        v2 = arith.view(a2)
        da2, dh_g = jax.vjp(cpl.combine, v2, h_g)[1](db2)
        dgp, db1_from_g, dctx_g = g_vjp(dh_g)
        db1 = db1 + db1_from_g
        if isolates(arith):
            # F's isolated evaluation waits for G's pullback (else XLA may run it beside G's
            # recomputation and hold both branches' intermediates at once).
            a2, db1 = lax.optimization_barrier((a2, db1))
        # F(x2): rebuilds x1, pulls back the cotangent of y1.
        h_f, f_vjp, q_f = branch(s.f, p_f, a2, kf)
        a1 = exact(i, rebuild(b1, h_f, q_f), 0)
        da1, dh_f = jax.vjp(cpl.combine, arith.view(a1), h_f)[1](db1)
        dfp, da2_from_f, dctx_f = f_vjp(dh_f)
        da2 = da2 + da2_from_f
        dctx = add_cotangents(dctx, add_cotangents(dctx_g, dctx_f))
        if check is not None:
            mine = jnp.concatenate([checksum(q_f), checksum(q_g)])
            bad = bad + jnp.any(mine != check).astype(jnp.int32)
        return (a1, a2, da1, da2, dctx, bad), (dfp, dgp)

    bad = jnp.zeros((), jnp.int32)
    units = (None, None) if lazy else (fp, gp)
    (x1, x2, dx1, dx2, dcontext, bad), (dfp, dgp) = lax.scan(
        body,
        (y1, y2, dy1, dy2, dcontext, bad),
        (jnp.arange(n), *units, keys, checks),
        reverse=True,
        unroll=s.unroll,
    )
    return (x1, x2), (dx1, dx2), (dfp, dgp, dcontext), bad


def _make_memory_saving(setting: SequenceSetting):
    """Builds the custom-VJP sequence for one static setting: ``((y1, y2), aux, peak)``."""
    arith = setting.arith

    def forward(f_params, g_params, x1, x2, keys, context, setting=setting):
        n = count_units(f_params, g_params)
        k = setting.exact_every
        plan = None if k is None else exact_range(n, k)
        peak = _input_peak(setting, x1, x2)
        (c1, c2), aux, stored, peak, checks = scan_forward(
            setting,
            f_params,
            g_params,
            arith.enter(x1),
            arith.enter(x2),
            keys,
            context,
            peak,
            stored_units=plan,
        )
        y1, y2 = in_range(arith, peak, arith.leave(c1), arith.leave(c2))
        return ((y1, y2), aux, peak), (c1, c2, stored, checks)

    # ``probe`` (a float32 scalar, value unused): its cotangent is the backward's count of
    # units whose rebuild differed from the forward (see `sequence_backward`).
    # Without differentiation nothing is rebuilt, so F and G need no isolation: they run
    # inline (cheaper; on CPU the isolated evaluation also computes the pullback's residuals).
    inline = (
        setting._replace(arith=arith._replace(isolate=False)) if isolates(arith) else setting
    )

    @jax.custom_vjp
    def run(f_params, g_params, x1, x2, keys, context, probe):
        return forward(f_params, g_params, x1, x2, keys, context, inline)[0]

    def run_fwd(f_params, g_params, x1, x2, keys, context, probe):
        out, (c1, c2, stored, checks) = forward(f_params, g_params, x1, x2, keys, context)
        # The residuals: parameters, the output carries (exact: for fixed point the backward
        # rebuilds from the int32 carries, not from the rounded float outputs; see
        # `output_residual`), the keys, the side inputs, with exact_every the exact input
        # carries of `exact_units`, and four int32 checks per unit. No other activation.
        outputs, saved = output_residual(arith, out[0], (c1, c2))
        return (outputs, *out[1:]), (f_params, g_params, saved, keys, context, stored, checks)

    def run_bwd(residuals, cotangents):
        f_params, g_params, saved, keys, context, stored, checks = residuals
        (dy1, dy2), _, _ = cotangents  # aux and peak are not differentiated
        # Restored only once the cotangent exists: left free, XLA computes the int32 carries
        # in the forward pass and keeps them (see `tie_to_cotangent`).
        c1, c2 = output_carries(arith, tie_to_cotangent(saved, (dy1, dy2)))
        _, (dx1, dx2), (dfp, dgp, dcontext), bad = sequence_backward(
            setting, f_params, g_params, c1, c2, keys, context, stored, dy1, dy2, checks=checks
        )
        return dfp, dgp, dx1, dx2, None, dcontext, bad.astype(jnp.float32)

    run.defvjp(run_fwd, run_bwd)
    return run


def inverse_sequence(
    f: Callable,
    g: Callable,
    f_params: PyTree,
    g_params: PyTree,
    y1: Array,
    y2: Array,
    *,
    coupling: str | Coupling = "additive",
    has_aux: bool = False,
    keys: Array | None = None,
    unroll: int | bool | None = None,
    context: PyTree = None,
    arithmetic: str = "float",
    frac_bits: int = DEFAULT_FRAC_BITS,
) -> tuple[Array, Array]:
    """Rebuilds the input of `reversible_sequence` from its output (units in reverse).

    Takes the same arguments as `reversible_sequence` (aux outputs of F/G are discarded).
    Used to test reconstruction and to measure numerical drift. With ``arithmetic="fixed"`` the
    output is rounded to the grid on entry and the rebuild runs on int32 carries; it is exact
    when ``(y1, y2)`` are the fixed-point sequence's outputs and their carries fit the halves'
    float precision (``|value| < 2**(mantissa bits - frac_bits)``: 256 for float32 with 16
    fraction bits).
    """
    cpl = get_coupling(coupling)
    check_arithmetic(arithmetic, frac_bits, cpl)
    n = count_units(f_params, g_params)
    if unroll is None:
        unroll = default_unroll(n)
    if context is not None:
        check_context(context)
    f_branch = Branch(f, has_aux, keys is not None, context is not None)
    g_branch = Branch(g, has_aux, keys is not None, context is not None)
    arith = make_carry(arithmetic, frac_bits, jnp.result_type(y1))

    lazy = slices_inside(arith)

    def body(carry, xs):
        i, fp, gp, key = xs
        if lazy:  # as the forward's isolated evaluations take them
            fp, gp = UnitParams(f_params, i), UnitParams(g_params, i)
        return unit_inverse(arith, cpl, f_branch, g_branch, fp, gp, key, context, *carry), None

    (c1, c2), _ = lax.scan(
        body,
        (arith.enter(y1), arith.enter(y2)),
        (jnp.arange(n), None, None, keys) if lazy else (jnp.arange(n), f_params, g_params, keys),
        reverse=True,
        unroll=unroll,
    )
    return arith.leave(c1), arith.leave(c2)


def relative_error(a: PyTree, b: PyTree) -> Array:
    """Global relative error ``||a - b|| / max(||b||, tiny)`` over all leaves of two pytrees.

    One compiled program per pair of tree structures and shapes (op by op, every leaf's shape
    would compile its own subtract, square and sum)."""
    return _relative_error(a, b)


@jax.jit
def _relative_error(a: PyTree, b: PyTree) -> Array:
    diff = sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    ref = sum(jnp.sum(jnp.square(y)) for y in jax.tree.leaves(b))
    tiny = math.sqrt(float(jnp.finfo(jnp.result_type(*jax.tree.leaves(b))).tiny))
    return jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(ref), tiny)
