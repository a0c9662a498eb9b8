"""One reversible unit on carries, and the helpers every scan over units shares.

`unit_forward` / `unit_inverse` are the one definition of a unit that the sequence, the chain,
the inverse and the drift measurements all run. `Branch` normalises a residual function to
``(params, x, key, context) -> (h, aux)``; `vjp_inexact` differentiates only the inexact leaves;
`after` and `tie_to_cotangent` keep a backward's recomputation from being scheduled before its
cotangent exists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from revjax._carry import max_abs, quantize
from revjax._platform import target_platform

Array = jax.Array
PyTree = Any


# --------------------------------------------------------------------------------------------
# Scans over units: unroll, unit count, residual functions, cotangents
# --------------------------------------------------------------------------------------------


def default_unroll(n: int) -> int:
    """Scan unroll used when ``unroll=None``: full on CPU, rolled on GPU/TPU.

    XLA:CPU runs convolution gradients inside a rolled ``lax.scan`` (a while loop) ~90x slower
    than the same code unrolled (jax-ml/jax#12868); GPU and TPU don't have this problem and a
    rolled scan keeps compile time independent of depth there. The platform is
    `revjax.target_platform` (JAX's default backend, or `revjax.compiling_for`'s).
    """
    return max(n, 1) if target_platform() == "cpu" else 1


def count_units(f_params: PyTree, g_params: PyTree) -> int:
    leaves = jax.tree.leaves((f_params, g_params))
    if not leaves:
        raise ValueError(
            "f_params and g_params have no array leaves, so the number of units is unknown: "
            "give each unit's parameters a leading axis of length n (stack them)."
        )
    lengths = set()
    for leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                "Every leaf of f_params and g_params needs a leading unit axis; found a scalar "
                "leaf. Stack per-unit parameters (e.g. jax.tree.map(lambda *a: jnp.stack(a), "
                "*units))."
            )
        lengths.add(shape[0])
    if len(lengths) != 1:
        raise ValueError(
            "f_params and g_params must share one leading axis (the number of units); found "
            f"leading sizes {sorted(lengths)}. Stack every unit's parameters the same number of "
            "times."
        )
    (n,) = lengths
    if n < 1:
        raise ValueError("reversible_sequence needs at least one unit (leading axis of size 0).")
    return n


def unit_slice(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda a: a[i], tree)


class UnitParams(NamedTuple):
    """Unit ``index``'s parameters, still inside ``stacked`` (leaves with a leading unit axis).

    A scan over units hands its isolated evaluations (`isolated_branch`) this instead of the
    unit's slice where the isolation is a pair of optimisation barriers (GPU, TPU): the slice
    is taken after the input barrier, inside the evaluation, so XLA fuses it with the
    branch's cast of its parameters to the compute dtype. A slice taken before the barrier
    is held in the parameters' own dtype (float32 beside bfloat16 compute: twice the bytes)
    through the isolated evaluation and, in the backward, the pullback's recomputation.
    """

    stacked: PyTree
    index: Array

    def get(self) -> PyTree:
        """The unit's slice of every leaf."""
        return jax.tree.map(
            lambda a: lax.dynamic_index_in_dim(a, self.index, keepdims=False), self.stacked
        )


def unit_params(params: PyTree) -> PyTree:
    """The parameters a branch is called with: `UnitParams.get`, or ``params`` as given."""
    return params.get() if isinstance(params, UnitParams) else params


def split_unit_key(key: Array | None) -> tuple[Array | None, Array | None]:
    """One key per unit, split into independent keys for F and G."""
    if key is None:
        return None, None
    kf, kg = jax.random.split(key)
    return kf, kg


class Branch(NamedTuple):
    """A residual function normalised to ``(params, x, key, context) -> (h, aux)``."""

    fn: Callable
    has_aux: bool
    uses_key: bool
    uses_context: bool = False

    def __call__(
        self, params: PyTree, x: Array, key: Array | None, context: PyTree = None
    ) -> tuple[Any, Any]:
        args = (params, x) + ((key,) if self.uses_key else ())
        args += (context,) if self.uses_context else ()
        out = self.fn(*args)
        if self.has_aux:
            if not (isinstance(out, tuple | list) and len(out) == 2):
                raise ValueError(
                    "With has_aux=True, F and G must return a pair (output, aux); got "
                    f"{jax.tree.structure(out)}."
                )
            return out[0], out[1]
        return out, None


def differentiable(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def check_context(context: PyTree) -> None:
    """Side inputs must be a pytree of arrays (they are traced, and float leaves differentiated)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(context):
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic):
            raise ValueError(
                "context must be a pytree of arrays (side inputs shared by every unit, which "
                f"receive gradients); the leaf at {jax.tree_util.keystr(path) or 'the root'} is a "
                f"{type(leaf).__name__}. Wrap numbers with jnp.asarray(...), and pass static "
                "settings (flags, modules, strings) through the functions' closures or, with "
                "revjax.ReversibleSequence, as keyword arguments."
            )


def vjp_inexact(fn: Callable, *args) -> tuple[Any, Callable]:
    """`jax.vjp` of ``fn`` w.r.t. the inexact leaves of ``args`` only.

    Other leaves (integer RNG counters, PRNG keys, boolean masks) are passed through as
    constants, and their cotangent is ``None`` (a zero cotangent for `jax.custom_vjp`).
    """
    leaves, treedef = jax.tree.flatten(args)
    where = [i for i, leaf in enumerate(leaves) if differentiable(leaf)]

    def fn_of_inexact(*inexact):
        full = list(leaves)
        for i, leaf in zip(where, inexact, strict=True):
            full[i] = leaf
        return fn(*jax.tree.unflatten(treedef, full))

    out, vjp = jax.vjp(fn_of_inexact, *(leaves[i] for i in where))

    def pullback(ct):
        full = [None] * len(leaves)
        for i, d in zip(where, vjp(ct), strict=True):
            full[i] = d
        return jax.tree.unflatten(treedef, full)

    return out, pullback


def add_cotangents(a: PyTree, b: PyTree) -> PyTree:
    # Both trees have None where a leaf is not differentiable.
    return jax.tree.map(jnp.add, a, b)


# --------------------------------------------------------------------------------------------
# One unit, forward and inverse (the one definition every scan uses)
# --------------------------------------------------------------------------------------------


def isolates(arith) -> bool:
    """Whether ``arith`` evaluates F and G through `isolated_branch` (fixed point, the
    ``rebuild="isolated"`` mode)."""
    return bool(getattr(arith, "isolate", False))


def isolation_keeps_pullback() -> bool:
    """Whether `isolated_branch` evaluates the branch's pullback residuals too, so that the
    backward differentiates from them instead of recomputing the branch (`isolated_pullback`):
    on CPU (`target_platform`), where the branch is a conditional's."""
    return target_platform() == "cpu"


def slices_inside(arith) -> bool:
    """Whether scans over units pass `UnitParams` to ``arith``'s isolated evaluations: fixed
    point with ``rebuild="isolated"`` where the isolation is barriers (not CPU: there the
    conditional also yields the pullback's residuals with respect to the unit's slice)."""
    return isolates(arith) and not isolation_keeps_pullback()


def _zeros(s: jax.ShapeDtypeStruct) -> Array:
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, s)
        return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype))
    return jnp.zeros(s.shape, s.dtype)


def _zero_of(tree: PyTree) -> Array:
    """An int32 0 computed from every element of ``tree`` (times zero, which XLA does not fold
    for floats): keeps each leaf a used output of the computation that made it."""
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total = total + jnp.sum(leaf.astype(jnp.float32)) * 0
    return total.astype(jnp.int32)


class _Linearised(NamedTuple):
    """What `isolated_branch`'s conditional knows statically about the branch's pullback."""

    residuals: Any  # the treedef of the `jax.vjp` pullback (its leaves: the residuals)
    operands: Any  # the treedef of (params, view, context)
    where: tuple  # positions of their inexact leaves (the differentiated ones)
    output: jax.ShapeDtypeStruct  # h's shape and dtype


def _evaluate(arith, branch, operands, linearised=None):
    """The branch on ``(params, view, key, context)``: ``(q, aux, max |h|, residuals)``. With
    a ``linearised`` dict, also its `jax.vjp` with respect to the inexact leaves of params,
    view and context: residuals are the pullback's leaves, their structure goes into the dict."""
    params, view, key, context = operands
    if linearised is None:
        h, aux = branch(params, view, key, context)
        return quantize(h, arith.frac_bits), aux, max_abs(h), ()
    leaves, treedef = jax.tree.flatten((params, view, context))
    where = tuple(i for i, leaf in enumerate(leaves) if differentiable(leaf))

    def of_inexact(*inexact):
        full = list(leaves)
        for i, leaf in zip(where, inexact, strict=True):
            full[i] = leaf
        p, v, ctx = jax.tree.unflatten(treedef, full)
        return branch(p, v, key, ctx)

    h, pullback, aux = jax.vjp(of_inexact, *(leaves[i] for i in where), has_aux=True)
    residuals, tree = jax.tree.flatten(pullback)
    linearised["value"] = _Linearised(tree, treedef, where, jax.ShapeDtypeStruct(h.shape, h.dtype))
    return quantize(h, arith.frac_bits), aux, max_abs(h), residuals


def _isolated(arith, branch, params, c, key, context):
    """``(q, aux, magnitude, residuals, linearised)`` of one isolated evaluation (see
    `isolated_branch`); residuals and linearised only where `isolation_keeps_pullback`.
    ``params``: the unit's parameters or `UnitParams` (sliced after the input barrier).

    Aux, magnitude and every residual feed ``q`` times zero (which XLA does not fold for
    floats), in the forward's evaluation as in the rebuild's: whichever outputs a caller
    drops (a rebuild needs neither aux nor magnitude; a gradient may discard the updated
    BatchNorm statistics), XLA cannot drop their computation from one evaluation only and
    fuse the rest of the branch differently from the other (XLA:TPU did, for conv +
    BatchNorm), and on CPU every output of the conditional stays used."""
    q, aux, magnitude, residuals, linearised = _evaluate_isolated(
        arith, branch, params, c, key, context
    )
    return q + _zero_of((aux, magnitude, residuals)), aux, magnitude, residuals, linearised


def _evaluate_isolated(arith, branch, params, c, key, context):
    """`_isolated` before the fold: barriers (GPU, TPU) or a conditional (CPU)."""
    if not isolation_keeps_pullback():
        operands = lax.optimization_barrier((params, arith.view(c), key, context))
        operands = (unit_params(operands[0]), *operands[1:])
        out = lax.optimization_barrier(_evaluate(arith, branch, operands)[:3])
        return (*out, (), None)
    operands = (unit_params(params), arith.view(c), key, context)
    linearised = {}
    run = lambda ops: _evaluate(arith, branch, ops, linearised)
    if not operands[1].size:  # an empty batch: nothing to compute, nothing to isolate
        out = run(operands)
    else:
        shapes = jax.eval_shape(run, operands)
        first = operands[1].reshape(-1)[0]
        out = lax.cond(
            first == first,  # true at run time (the view is never NaN), unknown to XLA
            run,
            lambda _: jax.tree.map(_zeros, shapes),
            operands,
        )
    return (*out, linearised["value"])


def isolated_branch(arith, branch, params, c, key, context):
    """F or G on the carry ``c``, evaluated in isolation, with its output rounded to the grid.

    The forward and the backward's rebuild both evaluate a branch through this one function
    (or `isolated_pullback`, the same computation), so that they run the same computation,
    which XLA must not fuse with what surrounds it (the next combine in the forward, the
    pullback in the backward). On CPU the branch is that of a conditional whose predicate is
    true at run time but unknown to XLA, so it is compiled as a computation of its own:
    XLA:CPU removes optimisation barriers before fusion, and with barriers alone a RevNet
    stage's rebuild differed at its default optimisation level. The conditional also computes
    the branch's pullback residuals (`jax.vjp`), in the forward as in the backward, where
    `isolated_pullback` differentiates from them instead of evaluating the branch a third
    time; every output is used in both places (the forward folds the residuals into the
    result times zero), so XLA compiles the two conditionals alike. On GPU and TPU, where a
    conditional costs a predicate read and more memory (RevNet-164's train step on the H100
    target), `lax.optimization_barrier` on the branch's inputs and outputs isolates it, and
    the backward's pullback recomputes the branch; there ``params`` may be `UnitParams` (a
    scan's stacked parameters, sliced inside). The choice follows `target_platform` (set
    `revjax.compiling_for` to trace for another device); the in-step check (`checksum`)
    counts any unit where the isolation did not hold.

    Returns:
      ``(q, aux, magnitude)``: the int32 rounded output ``q(h)``, the branch's aux, and
      ``max |h|`` (float32, NaN if h has a NaN, which rounding to int32 would hide).
    """
    return _isolated(arith, branch, params, c, key, context)[:3]


def rebuilt_output(arith, branch, params, c, key, context) -> Array:
    """The rounded output of `isolated_branch` for a rebuild, which needs neither aux nor
    magnitude (both still computed: `_isolated` folds them into it)."""
    return _isolated(arith, branch, params, c, key, context)[0]


def isolated_pullback(arith, branch, params, c, key, context):
    """`rebuilt_output` and the branch's pullback from the same isolated evaluation (where
    `isolation_keeps_pullback`): ``(q, pullback, h)``. ``pullback(dh)`` gives the cotangents
    of ``(params, view of c, context)`` (None for leaves that are not inexact, as
    `vjp_inexact`); ``h`` is zeros of the output's shape and dtype (the additive combine's
    pullback needs no values)."""
    q, _, _, residuals, lin = _isolated(arith, branch, params, c, key, context)
    vjp = jax.tree.unflatten(lin.residuals, residuals)

    def pullback(ct):
        full = [None] * lin.operands.num_leaves
        for i, d in zip(lin.where, vjp(ct), strict=True):
            full[i] = d
        return jax.tree.unflatten(lin.operands, full)

    return q, pullback, jnp.zeros(lin.output.shape, lin.output.dtype)


#: Odd multiplier of the position weights of `checksum` (2**32 / golden ratio, as int32).
_WEIGHT = -1640531535


def checksum(q: Array) -> Array:
    """Two wrapping int32 sums of an int32 array: plain and position-weighted, ``[2]``.

    Any single changed element changes both (the weights are odd, so a change of one grid
    step is never a multiple of 2**32); two opposite changes cancel in the plain sum but not,
    short of a weight coincidence, in the weighted one.
    """
    flat = q.reshape(-1)
    weights = lax.iota(jnp.int32, flat.size) * jnp.int32(_WEIGHT) | jnp.int32(1)
    return jnp.stack([jnp.sum(flat, dtype=jnp.int32), jnp.sum(flat * weights, dtype=jnp.int32)])


def unit_forward(arith, cpl, f_branch, g_branch, fp, gp, key, context, a1, a2, peak=None):
    """One reversible unit on carries: ``b1 = a1 (+) F(a2)``, ``b2 = a2 (+) G(b1)``.

    ``arith`` is the carry arithmetic (`make_carry`), ``f_branch`` / ``g_branch`` the
    normalised residual functions ``(params, x, key, context) -> (h, aux)``, ``key`` the unit's
    key (split into F's and G's). With ``peak`` (a float32 scalar, or None to skip), also
    returns the largest magnitude of the unit's input carries and F/G outputs so far. With
    fixed-point carries F and G run through `isolated_branch` (``rebuild="isolated"``) or
    inline, and the unit's rebuild check is the `checksum` of their rounded outputs.

    Returns:
      ``((b1, b2), (aux_f, aux_g), peak, check)``; ``check`` is int32 ``[4]`` (F's checksum,
      then G's) for fixed point, None for floats.
    """
    kf, kg = split_unit_key(key)
    if isolates(arith):
        q_f, aux_f, m_f = isolated_branch(arith, f_branch, fp, a2, kf, context)
        b1 = a1 + q_f
        q_g, aux_g, m_g = isolated_branch(arith, g_branch, gp, b1, kg, context)
        b2 = a2 + q_g
        check = jnp.concatenate([checksum(q_f), checksum(q_g)])
    else:
        h_f, aux_f = f_branch(fp, arith.view(a2), kf, context)
        b1 = arith.combine(cpl, a1, h_f)
        h_g, aux_g = g_branch(gp, arith.view(b1), kg, context)
        b2 = arith.combine(cpl, a2, h_g)
        check = None
        if arith.fixed and not arith.traced:
            rounded = (quantize(h, arith.frac_bits) for h in (h_f, h_g))
            check = jnp.concatenate([checksum(q) for q in rounded])
        m_f, m_g = (max_abs(h_f), max_abs(h_g)) if peak is not None else (None, None)
    if peak is not None:
        parts = (arith.magnitude(a1), arith.magnitude(a2), m_f, m_g)
        peak = functools.reduce(jnp.maximum, parts, peak)
    return (b1, b2), (aux_f, aux_g), peak, check


def unit_inverse(arith, cpl, f_branch, g_branch, fp, gp, key, context, b1, b2):
    """Inverse of `unit_forward`: ``a2 = b2 (-) G(b1)``, ``a1 = b1 (-) F(a2)`` (aux discarded)."""
    kf, kg = split_unit_key(key)
    if isolates(arith):
        a2 = b2 - rebuilt_output(arith, g_branch, gp, b1, kg, context)
        return b1 - rebuilt_output(arith, f_branch, fp, a2, kf, context), a2
    a2 = arith.uncombine(cpl, b2, g_branch(gp, arith.view(b1), kg, context)[0])
    a1 = arith.uncombine(cpl, b1, f_branch(fp, arith.view(a2), kf, context)[0])
    return a1, a2


# --------------------------------------------------------------------------------------------
# Keeping a recomputation after its cotangent
# --------------------------------------------------------------------------------------------


def after(b1, b2, db1, db2):
    """Makes ``(b1, b2)`` data-dependent on the cotangents ``(db1, db2)`` at no real cost.

    The rebuilt activations depend only on residuals, so XLA may schedule a unit's
    reconstruction long before its cotangent exists, e.g. during a later stage's forward pass,
    which keeps every rebuilt activation alive at once (seen on XLA:CPU with unrolled scans,
    where optimisation barriers do not prevent it). Adding ``0 * ct`` (not folded away for
    floats, since ``0 * nan`` is ``nan``) forces the reconstruction to wait for the cotangent.
    A non-finite cotangent then makes the rebuilt input non-finite too, but the gradients are
    non-finite in that case anyway.
    """
    return b1 + (db1 * 0).astype(b1.dtype), b2 + (db2 * 0).astype(b2.dtype)


def tie_to_cotangent(tree: PyTree, cotangent: PyTree) -> PyTree:
    """Makes every floating leaf of ``tree`` data-dependent on ``cotangent`` (adds ``0 * c``).

    For a recomputation inside a custom backward whose inputs are residuals of any shape: it
    then cannot be scheduled before the backward reaches it (see `after`, the elementwise
    form used when the shapes match).
    """
    first = jax.tree.leaves(cotangent)[0]
    # [1]; an empty cotangent (an empty batch) has nothing to wait for
    zero = first.reshape(-1)[:1] * 0 if first.size else jnp.zeros((1,), first.dtype)

    def tie(a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a + zero.astype(a.dtype).reshape((1,) * a.ndim)

    return jax.tree.map(tie, tree)
