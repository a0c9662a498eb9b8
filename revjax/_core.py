"""The reversible core: couplings and `reversible_sequence`, in pure JAX (no Flax).

A reversible unit works on two halves ``(x1, x2)`` of its input::

    y1 = x1 (+) F(x2)
    y2 = x2 (+) G(y1)

where ``(+)`` is the coupling's combine rule. Because ``x2 = y2 (-) G(y1)`` and
``x1 = y1 (-) F(x2)``, the backward pass can rebuild every unit's input from its output, so a
sequence of n units stores only its output, whatever n is (Gomez et al., 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
PyTree = Any

__all__ = [
    "ChainSegment",
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "get_coupling",
    "merge_halves",
    "reversible_chain",
    "reversible_sequence",
    "sequence_segment",
    "shortcut_unit_segment",
    "split_halves",
]


# --------------------------------------------------------------------------------------------
# Couplings
# --------------------------------------------------------------------------------------------


class Coupling(NamedTuple):
    """How a residual branch's output ``h`` is combined with the half it updates.

    A coupling is pure math on arrays (the optax ``GradientTransformation`` pattern):

    Attributes:
      name: ``"additive"`` or ``"affine"``.
      combine: ``(x, h) -> y``; the forward rule for one half.
      uncombine: ``(y, h) -> x``; its exact inverse (up to rounding).
    """

    name: str
    combine: Callable[[Array, Any], Array]
    uncombine: Callable[[Array, Any], Array]

    def forward(self, f: Callable, g: Callable, x1: Array, x2: Array) -> tuple[Array, Array]:
        """One unit forward: ``y1 = combine(x1, f(x2))``, ``y2 = combine(x2, g(y1))``.

        ``f`` and ``g`` are closures over their parameters (``x -> h``).
        """
        y1 = self.combine(x1, f(x2))
        y2 = self.combine(x2, g(y1))
        return y1, y2

    def inverse(self, f: Callable, g: Callable, y1: Array, y2: Array) -> tuple[Array, Array]:
        """One unit inverse: ``x2 = uncombine(y2, g(y1))``, ``x1 = uncombine(y1, f(x2))``."""
        x2 = self.uncombine(y2, g(y1))
        x1 = self.uncombine(y1, f(x2))
        return x1, x2


def _cast_like(h: Array, x: Array) -> Array:
    # The carry keeps its own dtype: a bfloat16 branch added to a float32 half stays float32,
    # which is what keeps the reconstruction in float32 under mixed precision.
    return h.astype(x.dtype)


def _additive_combine(x: Array, h: Array) -> Array:
    return x + _cast_like(h, x)


def _additive_uncombine(y: Array, h: Array) -> Array:
    return y - _cast_like(h, y)


#: Additive coupling: ``y = x + h``, inverse ``x = y - h``.
additive_coupling = Coupling("additive", _additive_combine, _additive_uncombine)


def affine_scale(log_scale: Array) -> Array:
    """The affine coupling's scale: ``exp(tanh(s))``, strictly inside ``(1/e, e)``.

    Bounded on both sides so the inverse (a division) always exists and never amplifies
    rounding error by more than ``e`` per half; ``s = 0`` gives the identity scale 1.
    """
    return jnp.exp(jnp.tanh(log_scale))


def _affine_parts(h: Any, x: Array) -> tuple[Array, Array]:
    if not (isinstance(h, tuple | list) and len(h) == 2):
        raise ValueError(
            "The affine coupling needs F and G to return a pair (log_scale, shift), each shaped "
            f"like the half they update; got {jax.tree.structure(h)}. Return a 2-tuple, or use "
            "coupling='additive'."
        )
    log_scale, shift = h
    return affine_scale(_cast_like(log_scale, x)), _cast_like(shift, x)


def _affine_combine(x: Array, h: Any) -> Array:
    scale, shift = _affine_parts(h, x)
    return x * scale + shift


def _affine_uncombine(y: Array, h: Any) -> Array:
    scale, shift = _affine_parts(h, y)
    return (y - shift) / scale


#: Affine coupling: F and G return ``(s, t)``; ``y = x * exp(tanh(s)) + t``, inverse
#: ``x = (y - t) / exp(tanh(s))``. The scale lies strictly in ``(1/e, e)``, so the inverse always
#: exists and each half's rounding error is amplified by at most ``e`` per unit.
affine_coupling = Coupling("affine", _affine_combine, _affine_uncombine)

_COUPLINGS = {"additive": additive_coupling, "affine": affine_coupling}


def get_coupling(coupling: str | Coupling) -> Coupling:
    """Returns the `Coupling` named by ``coupling`` (``"additive"`` or ``"affine"``)."""
    if isinstance(coupling, Coupling):
        return coupling
    try:
        return _COUPLINGS[coupling]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown coupling {coupling!r}; expected one of {sorted(_COUPLINGS)} or a "
            "revjax.Coupling."
        ) from None


# --------------------------------------------------------------------------------------------
# Halves
# --------------------------------------------------------------------------------------------


def split_halves(x: Array, axis: int = -1) -> tuple[Array, Array]:
    """Splits ``x`` into two equal halves along ``axis`` (the channel axis by default).

    Raises:
      ValueError: if the axis has an odd size.
    """
    size = x.shape[axis]
    if size % 2:
        raise ValueError(
            f"Cannot split {size} channels (axis {axis} of shape {x.shape}) into two equal halves "
            "for a reversible unit: use an even channel count, e.g. widen the layer before it to "
            f"{size + 1}."
        )
    x1, x2 = jnp.split(x, 2, axis=axis)
    return x1, x2


def merge_halves(x1: Array, x2: Array, axis: int = -1) -> Array:
    """Inverse of `split_halves`: concatenates the halves along ``axis``."""
    return jnp.concatenate([x1, x2], axis=axis)


# --------------------------------------------------------------------------------------------
# reversible_sequence
# --------------------------------------------------------------------------------------------


def default_unroll(n: int) -> int:
    """Scan unroll used when ``unroll=None``: full on CPU, rolled on GPU/TPU.

    XLA:CPU runs convolution gradients inside a rolled ``lax.scan`` (a while loop) ~90x slower
    than the same code unrolled (jax-ml/jax#12868, measured again here); GPU and TPU don't have
    this problem and a rolled scan keeps compile time independent of depth there.
    """
    return max(n, 1) if jax.default_backend() == "cpu" else 1


def _num_units(f_params: PyTree, g_params: PyTree) -> int:
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


def _unit_slice(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda a: a[i], tree)


def _split_unit_key(key: Array | None) -> tuple[Array | None, Array | None]:
    """One key per unit, split into independent keys for F and G."""
    if key is None:
        return None, None
    kf, kg = jax.random.split(key)
    return kf, kg


class _Branch(NamedTuple):
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


def _differentiable(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _check_context(context: PyTree) -> None:
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


def _vjp_inexact(fn: Callable, *args) -> tuple[Any, Callable]:
    """`jax.vjp` of ``fn`` w.r.t. the inexact leaves of ``args`` only.

    Other leaves (integer RNG counters, PRNG keys, boolean masks) are passed through as
    constants, and their cotangent is ``None`` (a zero cotangent for `jax.custom_vjp`).
    """
    leaves, treedef = jax.tree.flatten(args)
    where = [i for i, leaf in enumerate(leaves) if _differentiable(leaf)]

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


def _add_cotangents(a: PyTree, b: PyTree) -> PyTree:
    # Both trees have None where a leaf is not differentiable.
    return jax.tree.map(jnp.add, a, b)


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
):
    """Applies n reversible units in sequence, storing no per-unit activation.

    Unit i computes ``y1 = x1 (+) F(x2)``, ``y2 = x2 (+) G(y1)`` with the i-th slice of the
    stacked parameters; its output is unit i+1's input. With the additive coupling ``(+)`` is
    ``+``; with the affine coupling F and G return ``(s, t)`` and ``x (+) (s, t) =
    x * exp(tanh(s)) + t``.

    With ``memory_saving=True`` the whole sequence is one `jax.custom_vjp`. Its forward saves
    only ``(f_params, g_params, y1, y2, keys, context)``; its backward walks the units in
    reverse and evaluates G(y1) and F(x2) once each through `jax.vjp`, using each primal output
    both to rebuild the input (``x2 = y2 (-) G(y1)``, ``x1 = y1 (-) F(x2)``) and to pull back the
    cotangent. Cost: one extra forward per unit; activation memory independent of n.

    Side inputs: ``context`` (a pytree of arrays, e.g. a conditioning vector, an attention mask
    or bias, a time embedding) is passed unchanged to every unit's F and G. Its inexact leaves
    receive gradients, summed over the units (and over F and G); the memory-saving backward
    accumulates them in its reverse scan, so they equal plain autodiff's.

    Args:
      f: ``(params, x2) -> h``; with ``keys`` it also takes the unit's key, with ``context``
        the context, in that order: ``(params, x2, key, context)``. Returns ``(h, aux)`` when
        ``has_aux``; ``h`` is shaped like ``x1`` (a pair for affine).
      g: the same for the second half: ``(params, y1) -> h`` shaped like ``x2``.
      f_params: pytree whose leaves all have a leading axis of length n. Leaves that are not
        inexact (integer RNG counters, PRNG keys) are sliced and passed like the others but get
        no gradient (``None`` / float0 cotangents).
      g_params: the same for G, with the same n.
      x1: first half of the input.
      x2: second half of the input.
      coupling: ``"additive"``, ``"affine"`` or a `Coupling`.
      has_aux: F and G return ``(h, aux)``; the aux of the forward pass are returned stacked
        over units (e.g. BatchNorm batch statistics). They are not differentiated (their
        cotangents are ignored) and the backward recomputation discards its own.
      keys: optional PRNG keys, one per unit (leading axis n, typed or raw ``uint32[n, 2]``).
        Unit i splits ``keys[i]`` into one key for F and one for G; the backward recomputation
        uses the same keys, so dropout inside F/G yields exactly plain autodiff's gradients.
      memory_saving: if False, plain autodiff through the same scan (stores activations);
        the reference for tests and benchmarks.
      unroll: ``lax.scan`` unroll. ``None`` picks `default_unroll`: fully unrolled on CPU
        (XLA:CPU runs conv gradients in a rolled scan ~90x slower, jax-ml/jax#12868), rolled
        (1) on GPU/TPU, where compile time then stays independent of depth. An unrolled scan
        still stores no activations, but its compiled temporary memory grows slightly with n
        (per-unit parameter-gradient pieces before stacking).
      remat: only with ``memory_saving=False``: wrap each unit in `jax.checkpoint`, so plain
        autodiff stores each unit's input and recomputes its inside (the usual gradient
        checkpointing baseline; memory still grows with n).
      exact_every: with ``memory_saving=True``, bound the chain of rebuilt units at k: store
        the exact input of units ``n-k, n-2k, ...`` (those > 0; see `exact_units`) and use it
        in the backward in place of the rebuilt one. Rebuilding starts from the exact output,
        so no input is rounded through more than k inverse units, with ``(n - 1) // k`` stored
        activations: none when ``n <= k``. ``k=1`` stores every input but unit 0's (rebuilt
        through one unit from unit 1's), so gradients equal plain autodiff's up to one unit's
        rounding; ``None`` (default) stores none.
      context: optional side inputs shared by every unit (a pytree of arrays, not stacked),
        passed to F and G as their last argument. Inexact leaves receive gradients summed over
        the units; other leaves (boolean masks, integer positions) get none.

    Returns:
      ``(y1, y2)``, or ``((y1, y2), (f_aux, g_aux))`` when ``has_aux``.

    Raises:
      ValueError: unknown coupling, params without a common leading axis, a number of keys
        different from n, a context that is not a pytree of arrays, or F/G outputs whose
        shapes don't fit the halves.
    """
    cpl = get_coupling(coupling)
    n = _num_units(f_params, g_params)
    if context is not None:
        _check_context(context)
    if keys is not None:
        n_keys = jnp.shape(keys)[0] if jnp.ndim(keys) else None
        if n_keys != n:
            raise ValueError(
                f"keys must hold one PRNG key per unit: expected a leading axis of {n}, got "
                f"shape {jnp.shape(keys)}. Use jax.random.split(key, {n})."
            )
    if unroll is None:
        unroll = default_unroll(n)
    f_branch = _Branch(f, has_aux, keys is not None, context is not None)
    g_branch = _Branch(g, has_aux, keys is not None, context is not None)
    _check_shapes(cpl, f_branch, g_branch, f_params, g_params, x1, x2, keys, context)

    if memory_saving and remat:
        raise ValueError(
            "remat=True checkpoints units of the plain-autodiff path; with memory_saving=True "
            "nothing is stored to begin with. Pass memory_saving=False with remat=True."
        )
    check_exact_every(exact_every)
    if memory_saving:
        run = _make_memory_saving(cpl, f_branch, g_branch, unroll, exact_every)
    else:
        run = lambda fp, gp, a, b, k, c: _scan_forward(
            cpl, f_branch, g_branch, unroll, fp, gp, a, b, k, c, remat=remat
        )
    (y1, y2), aux = run(f_params, g_params, x1, x2, keys, context)
    if has_aux:
        return (y1, y2), aux
    return y1, y2


def _check_shapes(cpl, f_branch, g_branch, f_params, g_params, x1, x2, keys, context) -> None:
    """Traces one unit abstractly and checks that F and G map the halves onto each other."""
    fp0, gp0 = _unit_slice(f_params, 0), _unit_slice(g_params, 0)
    kf, kg = _split_unit_key(None if keys is None else keys[0])

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


def _scan_forward(
    cpl, f_branch, g_branch, unroll, f_params, g_params, x1, x2, keys, context=None, remat=False
):
    """The forward sequence as a ``lax.scan``; also the plain-autodiff path."""

    def body(carry, xs):
        a1, a2 = carry
        fp, gp, key = xs
        kf, kg = _split_unit_key(key)
        h_f, aux_f = f_branch(fp, a2, kf, context)
        b1 = cpl.combine(a1, h_f)
        h_g, aux_g = g_branch(gp, b1, kg, context)
        b2 = cpl.combine(a2, h_g)
        return (b1, b2), (aux_f, aux_g)

    if remat:
        body = jax.checkpoint(body)
    (y1, y2), aux = lax.scan(body, (x1, x2), (f_params, g_params, keys), unroll=unroll)
    return (y1, y2), aux


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


def _exact_range(n: int, k: int) -> tuple[int, int]:
    """`exact_units(n, k)` as ``(first, count)``: units ``first, first + k, ...``."""
    count = (n - 1) // k
    return n - count * k, count


def _exact_slot(i: Array, first: int, count: int, k: int) -> tuple[Array, Array]:
    """For unit ``i`` (traced): ``(is unit i's input stored, its slot in the buffer)``.

    The stored units are ``first, first + k, ...`` (``count`` of them; see `_exact_range`).
    """
    keep = (i >= first) & ((i - first) % k == 0) & (i < first + count * k)
    slot = jnp.clip((i - first) // k, 0, max(count - 1, 0))
    return keep, slot


def _scan_forward_with_boundaries(
    cpl, f_branch, g_branch, unroll, k, fp, gp, x1, x2, keys, context=None, stored_units=None
):
    """The forward scan, also keeping the exact inputs of `exact_units` (n-k, n-2k, ... > 0).

    The stored inputs live in a carried buffer of ``(n - 1) // k`` activations per half,
    updated in place, so memory grows with ``n / k``; with ``n <= k`` it is the plain scan.
    ``stored_units``: ``(first, count)`` to store units ``first, first + k, ...`` instead
    (`reversible_chain` places them over the whole chain).
    """
    n = _num_units(fp, gp)
    first, n_stored = _exact_range(n, k) if stored_units is None else stored_units
    if not n_stored:
        (y1, y2), aux = _scan_forward(
            cpl, f_branch, g_branch, unroll, fp, gp, x1, x2, keys, context
        )
        return (y1, y2), aux, None
    buf1 = jnp.zeros((n_stored, *x1.shape), x1.dtype)  # [n_stored, *x1.shape]
    buf2 = jnp.zeros((n_stored, *x2.shape), x2.dtype)

    def body(carry, xs):
        a1, a2, s1, s2 = carry
        i, p_f, p_g, key = xs
        keep, slot = _exact_slot(i, first, n_stored, k)
        s1 = lax.dynamic_update_index_in_dim(s1, jnp.where(keep, a1, s1[slot]), slot, 0)
        s2 = lax.dynamic_update_index_in_dim(s2, jnp.where(keep, a2, s2[slot]), slot, 0)
        kf, kg = _split_unit_key(key)
        h_f, aux_f = f_branch(p_f, a2, kf, context)
        b1 = cpl.combine(a1, h_f)
        h_g, aux_g = g_branch(p_g, b1, kg, context)
        b2 = cpl.combine(a2, h_g)
        return (b1, b2, s1, s2), (aux_f, aux_g)

    (y1, y2, buf1, buf2), aux = lax.scan(
        body, (x1, x2, buf1, buf2), (jnp.arange(n), fp, gp, keys), unroll=unroll
    )
    return (y1, y2), aux, (buf1, buf2)


def _after(b1, b2, db1, db2):
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
    then cannot be scheduled before the backward reaches it (see `_after`, the elementwise
    form used when the shapes match).
    """
    first = jax.tree.leaves(cotangent)[0]
    zero = first.reshape(-1)[:1] * 0  # [1]

    def tie(a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a + zero.astype(a.dtype).reshape((1,) * a.ndim)

    return jax.tree.map(tie, tree)


def _sequence_backward(
    cpl,
    f_branch,
    g_branch,
    unroll,
    k,
    f_params,
    g_params,
    y1,
    y2,
    keys,
    context,
    stored,
    dy1,
    dy2,
    stored_units=None,
):
    """The memory-saving backward of a sequence: rebuilds its input while pulling back.

    Walks the units in reverse and evaluates G(y1) and F(x2) once each through `jax.vjp`,
    using each primal output both to rebuild the unit's input (``x2 = y2 (-) G(y1)``,
    ``x1 = y1 (-) F(x2)``) and to pull back the cotangent. ``stored``: the exact inputs kept by
    `_scan_forward_with_boundaries` (``(buf1, buf2)``) or None; ``stored_units`` as there.

    Returns:
      ``((x1, x2), (dx1, dx2), (df_params, dg_params, dcontext))``: the rebuilt input (exact
      up to rounding), its cotangent and the cotangents of the parameters and side inputs.
    """
    n = _num_units(f_params, g_params)
    if stored is not None:
        first, count = _exact_range(n, k) if stored_units is None else stored_units
    # Cotangent of the side inputs, summed over units: zeros for inexact leaves, None else.
    dcontext = jax.tree.map(lambda c: jnp.zeros_like(c) if _differentiable(c) else None, context)

    def exact(i, rebuilt, half):
        # With exact_every=k, the inputs of units n-k, n-2k, ... were stored: use them instead
        # of the rebuilt ones, so no chain of rebuilt units is longer than k.
        if stored is None:
            return rebuilt
        keep, slot = _exact_slot(i, first, count, k)
        return jnp.where(keep, stored[half][slot], rebuilt)

    def body(carry, xs):
        b1, b2, db1, db2, dctx = carry
        i, fp, gp, key = xs
        kf, kg = _split_unit_key(key)
        b1, b2 = _after(b1, b2, db1, db2)
        # G(y1) once: its value rebuilds x2, its VJP pulls back the cotangent of y2.
        # Non-inexact leaves of the parameters and context (RNG counters, masks) get None.
        h_g, g_vjp = _vjp_inexact(lambda p, a, c: g_branch(p, a, kg, c)[0], gp, b1, context)
        a2 = exact(i, cpl.uncombine(b2, h_g), 1)
        da2, dh_g = jax.vjp(cpl.combine, a2, h_g)[1](db2)
        dgp, db1_from_g, dctx_g = g_vjp(dh_g)
        db1 = db1 + db1_from_g
        # F(x2) once: its value rebuilds x1, its VJP pulls back the cotangent of y1.
        h_f, f_vjp = _vjp_inexact(lambda p, a, c: f_branch(p, a, kf, c)[0], fp, a2, context)
        a1 = exact(i, cpl.uncombine(b1, h_f), 0)
        da1, dh_f = jax.vjp(cpl.combine, a1, h_f)[1](db1)
        dfp, da2_from_f, dctx_f = f_vjp(dh_f)
        da2 = da2 + da2_from_f
        dctx = _add_cotangents(dctx, _add_cotangents(dctx_g, dctx_f))
        return (a1, a2, da1, da2, dctx), (dfp, dgp)

    (x1, x2, dx1, dx2, dcontext), (dfp, dgp) = lax.scan(
        body,
        (y1, y2, dy1, dy2, dcontext),
        (jnp.arange(n), f_params, g_params, keys),
        reverse=True,
        unroll=unroll,
    )
    return (x1, x2), (dx1, dx2), (dfp, dgp, dcontext)


def _make_memory_saving(cpl, f_branch, g_branch, unroll, exact_every=None):
    """Builds the custom-VJP sequence for one (coupling, F, G, unroll, exact_every) setting."""

    @jax.custom_vjp
    def run(f_params, g_params, x1, x2, keys, context):
        return _scan_forward(
            cpl, f_branch, g_branch, unroll, f_params, g_params, x1, x2, keys, context
        )

    def run_fwd(f_params, g_params, x1, x2, keys, context):
        if exact_every is None:
            (y1, y2), aux = _scan_forward(
                cpl, f_branch, g_branch, unroll, f_params, g_params, x1, x2, keys, context
            )
            stored = None
        else:
            inputs = (f_params, g_params, x1, x2, keys, context)
            (y1, y2), aux, stored = _scan_forward_with_boundaries(
                cpl, f_branch, g_branch, unroll, exact_every, *inputs
            )
        # The residuals: parameters, the sequence output, the keys, the side inputs (and, with
        # exact_every, the exact inputs of `exact_units`). No other activation.
        return ((y1, y2), aux), (f_params, g_params, y1, y2, keys, context, stored)

    def run_bwd(residuals, cotangents):
        f_params, g_params, y1, y2, keys, context, stored = residuals
        (dy1, dy2), _ = cotangents  # aux is not differentiated
        _, (dx1, dx2), (dfp, dgp, dcontext) = _sequence_backward(
            cpl, f_branch, g_branch, unroll, exact_every, f_params, g_params, y1, y2, keys,
            context, stored, dy1, dy2,
        )  # fmt: skip
        return dfp, dgp, dx1, dx2, None, dcontext

    run.defvjp(run_fwd, run_bwd)
    return run


# --------------------------------------------------------------------------------------------
# reversible_chain: several invertible segments, one custom VJP
# --------------------------------------------------------------------------------------------


class ChainSegment(NamedTuple):
    """One invertible piece of a `reversible_chain`, mapping halves to halves.

    Build them with `sequence_segment` (stacked reversible units) and `shortcut_unit_segment`
    (one unit whose halves change shape through an injective linear shortcut).

    Attributes:
      num_units: how many units the segment counts for ``exact_every`` placement.
      forward: ``(params, x1, x2, stored_units, k) -> ((y1, y2), aux, stored)``.
        ``stored_units`` is ``(first, count)`` or None: keep the exact inputs of local units
        ``first, first + k, ...`` (``stored`` holds them; None when nothing is kept).
      backward: ``(params, stored, y1, y2, dy1, dy2, stored_units, k) -> ((x1, x2), (dx1,
        dx2), dparams)``: rebuilds the segment's input from its output while pulling the
        cotangent back (using the stored inputs in place of rebuilt ones).
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
    f_branch, g_branch = _Branch(f, has_aux, False), _Branch(g, has_aux, False)

    def forward(params, x1, x2, stored_units, k):
        fp, gp = params
        if stored_units is None:
            (y1, y2), aux = _scan_forward(cpl, f_branch, g_branch, unroll, fp, gp, x1, x2, None)
            return (y1, y2), aux, None
        return _scan_forward_with_boundaries(
            cpl, f_branch, g_branch, unroll, k, fp, gp, x1, x2, None, None, stored_units
        )

    def backward(params, stored, y1, y2, dy1, dy2, stored_units, k):
        fp, gp = params
        x, dx, (dfp, dgp, _) = _sequence_backward(
            cpl, f_branch, g_branch, unroll, k, fp, gp, y1, y2, None, None, stored,
            dy1, dy2, stored_units,
        )  # fmt: skip
        return x, dx, (dfp, dgp)

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
    g_params)``, not stacked.
    """
    f_branch, g_branch = _Branch(f, has_aux, False), _Branch(g, has_aux, False)

    def combine(x, h):
        p = shortcut(x)
        return p + _cast_like(h, p)

    def forward(params, x1, x2, stored_units, k):
        fp, gp = params
        h_f, aux_f = f_branch(fp, x2, None)
        y1 = combine(x1, h_f)
        h_g, aux_g = g_branch(gp, y1, None)
        y2 = combine(x2, h_g)
        keep = stored_units is not None and stored_units[1]
        return (y1, y2), (aux_f, aux_g), ((x1, x2) if keep else None)

    def backward(params, stored, y1, y2, dy1, dy2, stored_units, k):
        fp, gp = params
        y1, y2 = _after(y1, y2, dy1, dy2)
        h_g, g_vjp = _vjp_inexact(lambda p, a: g_branch(p, a, None)[0], gp, y1)
        x2 = shortcut_inverse(y2 - _cast_like(h_g, y2)) if stored is None else stored[1]
        dx2, dh_g = jax.vjp(combine, x2, h_g)[1](dy2)
        dgp, dy1_from_g = g_vjp(dh_g)
        dy1 = dy1 + dy1_from_g
        # F's recomputation may not start before G's pullback is done: left free, XLA:GPU
        # overlaps them and holds both branches' full-size buffers at once (RevNet-164 with
        # invertible downsampling, H100 target, batch 128: 256.2 -> 226.1 MiB temp). A barrier
        # moves no data and computes nothing. dx2 stays out of it: forced early, it would live
        # through F's pullback (230.3 MiB with it).
        x2, dy1 = lax.optimization_barrier((x2, dy1))
        h_f, f_vjp = _vjp_inexact(lambda p, a: f_branch(p, a, None)[0], fp, x2)
        x1 = shortcut_inverse(y1 - _cast_like(h_f, y1)) if stored is None else stored[0]
        dx1, dh_f = jax.vjp(combine, x1, h_f)[1](dy1)
        dfp, dx2_from_f = f_vjp(dh_f)
        return (x1, x2), (dx1, dx2 + dx2_from_f), (dfp, dgp)

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

    Returns:
      ``((y1, y2), aux)``, ``aux`` holding each segment's F/G aux outputs (not differentiated).
    """
    segments, params = tuple(segments), tuple(params)
    if len(segments) != len(params):
        raise ValueError(
            f"reversible_chain needs one parameter pytree per segment: got {len(segments)} "
            f"segments and {len(params)} parameter pytrees."
        )
    check_exact_every(exact_every)
    plans = chain_exact_units(segments, exact_every if memory_saving else None)

    def forward(params, x1, x2, keep):
        auxes, stored = [], []
        for seg, p, plan in zip(segments, params, plans, strict=True):
            (x1, x2), aux, s = seg.forward(p, x1, x2, plan if keep else None, exact_every)
            auxes.append(aux)
            stored.append(s)
        return ((x1, x2), tuple(auxes)), tuple(stored)

    if not memory_saving:
        return forward(params, x1, x2, False)[0]

    @jax.custom_vjp
    def run(params, x1, x2):
        return forward(params, x1, x2, False)[0]

    def run_fwd(params, x1, x2):
        ((y1, y2), aux), stored = forward(params, x1, x2, True)
        # The residuals: parameters, the chain's output and the inputs `chain_exact_units`
        # names. No segment's output: each is rebuilt from the next one.
        return ((y1, y2), aux), (params, y1, y2, stored)

    def run_bwd(residuals, cotangents):
        params, y1, y2, stored = residuals
        (dy1, dy2), _ = cotangents  # aux is not differentiated
        dparams = [None] * len(segments)
        for j in reversed(range(len(segments))):
            (y1, y2), (dy1, dy2), dparams[j] = segments[j].backward(
                params[j], stored[j], y1, y2, dy1, dy2, plans[j], exact_every
            )
        return tuple(dparams), dy1, dy2

    run.defvjp(run_fwd, run_bwd)
    return run(params, x1, x2)


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
) -> tuple[Array, Array]:
    """Rebuilds the input of `reversible_sequence` from its output (units in reverse).

    Takes the same arguments as `reversible_sequence` (aux outputs of F/G are discarded).
    Used to test reconstruction and to measure numerical drift.
    """
    cpl = get_coupling(coupling)
    n = _num_units(f_params, g_params)
    if unroll is None:
        unroll = default_unroll(n)
    if context is not None:
        _check_context(context)
    f_branch = _Branch(f, has_aux, keys is not None, context is not None)
    g_branch = _Branch(g, has_aux, keys is not None, context is not None)

    def body(carry, xs):
        b1, b2 = carry
        fp, gp, key = xs
        kf, kg = _split_unit_key(key)
        a1, a2 = cpl.inverse(
            lambda a: f_branch(fp, a, kf, context)[0],
            lambda a: g_branch(gp, a, kg, context)[0],
            b1,
            b2,
        )
        return (a1, a2), None

    (x1, x2), _ = lax.scan(body, (y1, y2), (f_params, g_params, keys), reverse=True, unroll=unroll)
    return x1, x2


def relative_error(a: PyTree, b: PyTree) -> Array:
    """Global relative error ``||a - b|| / max(||b||, tiny)`` over all leaves of two pytrees."""
    diff = sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    ref = sum(jnp.sum(jnp.square(y)) for y in jax.tree.leaves(b))
    tiny = math.sqrt(float(jnp.finfo(jnp.result_type(*jax.tree.leaves(b))).tiny))
    return jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(ref), tiny)
