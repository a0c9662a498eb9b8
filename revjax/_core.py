"""The reversible core: couplings and `reversible_sequence`, in pure JAX (no Flax).

A reversible unit works on two halves ``(x1, x2)`` of its input::

    y1 = x1 (+) F(x2)
    y2 = x2 (+) G(y1)

where ``(+)`` is the coupling's combine rule. Because ``x2 = y2 (-) G(y1)`` and
``x1 = y1 (-) F(x2)``, the backward pass can rebuild every unit's input from its output, so a
sequence of n units stores only its output, whatever n is (Gomez et al., 2017).

The halves are carried in one of two arithmetics (`make_carry`): floating point, where the
rebuild is exact up to rounding, or int32 fixed point (``arithmetic="fixed"``), where each F/G
output is rounded to the grid ``2**-frac_bits`` before an integer addition, so the rebuild is
bit-exact whenever F computes the same bits twice. Every scan runs the same `unit_forward` /
`unit_inverse` on carries; the values crossing the custom VJPs stay floating.
"""

from __future__ import annotations

import functools
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
    "ARITHMETICS",
    "DEFAULT_FRAC_BITS",
    "CarryRangeError",
    "ChainSegment",
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "carry_limit",
    "get_coupling",
    "inverse_sequence",
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


# --------------------------------------------------------------------------------------------
# Carry arithmetic: floating point, or fixed point (exact)
# --------------------------------------------------------------------------------------------

ARITHMETICS = ("float", "fixed")

#: Fraction bits of the fixed-point carries when none are given: a grid step of 2**-16
#: (1.5e-5) and a range of ``|value| < 2**(30 - 16) = 16384`` (see `carry_limit`).
DEFAULT_FRAC_BITS = 16


class CarryRangeError(FloatingPointError):
    """A fixed-point carry left the range its fraction bits allow (it would wrap around).

    Attributes:
      where: what overflowed (a module path such as ``"stages/2/reversible"``, or a
        description).
      peak: the largest magnitude seen.
      frac_bits: the fraction bits in use.
    """

    def __init__(self, where: str, peak: float, frac_bits: int):
        self.where, self.peak, self.frac_bits = where, float(peak), int(frac_bits)
        limit = carry_limit(frac_bits)
        fewer = max(frac_bits - max(math.ceil(math.log2(max(peak, 1.0) * 2 / limit)), 1), 0)
        super().__init__(
            f"Fixed-point carries of {where} reached |value| = {peak:.6g}, beyond the range "
            f"{limit:g} that frac_bits={frac_bits} allows (int32 with {frac_bits} fraction bits "
            "would wrap around). Use fewer fraction bits (frac_bits="
            f"{fewer} doubles the headroom {2 ** (frac_bits - fewer):g}-fold), look for exploding "
            "weights or activations (a lower learning rate), or arithmetic='float'."
        )


def carry_limit(frac_bits: int) -> float:
    """Largest magnitude (exclusive) a fixed-point carry with ``frac_bits`` may reach: 2**(30-f).

    Half of int32's range, so that the sum of two in-range values (a carry and a rounded F/G
    output) cannot wrap around.
    """
    return float(2.0 ** (30 - frac_bits))


def check_arithmetic(
    arithmetic: Any, frac_bits: Any = DEFAULT_FRAC_BITS, coupling: Any = None, owner: str = ""
) -> None:
    """Raises a ValueError for an unknown arithmetic, bad ``frac_bits`` or fixed + affine."""
    prefix = f"{owner}: " if owner else ""
    if arithmetic not in ARITHMETICS:
        raise ValueError(
            f"{prefix}unknown arithmetic {arithmetic!r}; use 'float' (the paper's floating-point "
            "rebuild) or 'fixed' (int32 fixed-point carries: a bit-exact rebuild)."
        )
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 29:
        raise ValueError(
            f"{prefix}frac_bits must be an int in [0, 29] (fraction bits of the int32 carries), "
            f"got {frac_bits!r}. {DEFAULT_FRAC_BITS} is the default."
        )
    name = coupling.name if isinstance(coupling, Coupling) else coupling
    if arithmetic == "fixed" and name is not None and name != "additive":
        raise ValueError(
            f"{prefix}arithmetic='fixed' needs the additive coupling: an affine unit multiplies "
            "by a scale, which has no exact inverse on a fixed-point grid. Use "
            "coupling='additive', or arithmetic='float' with the affine coupling."
        )


def quantize(h: Array, frac_bits: int) -> Array:
    """Rounds ``h`` to the grid of step ``2**-frac_bits``, as int32 fixed point."""
    # At least float32: h * 2**frac_bits must hold the grid's integers exactly.
    h = h.astype(jnp.float64 if h.dtype == jnp.float64 else jnp.float32)
    return jnp.round(h * 2.0**frac_bits).astype(jnp.int32)


def dequantize(c: Array, frac_bits: int, dtype: Any) -> Array:
    """The float value of the int32 fixed-point ``c`` in ``dtype`` (rounded to its precision)."""
    return c.astype(dtype) * jnp.asarray(2.0**-frac_bits, dtype)


@jax.custom_jvp
def _straight_through(x: Array, value: Array) -> Array:
    """Returns ``value``, with the derivative of ``x`` (rounding's straight-through gradient)."""
    return value


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, value = primals
    dx, _ = tangents
    return value, dx


def _max_abs(tree: PyTree) -> Array:
    """Largest ``|leaf|`` over the leaves of ``tree``, float32 (NaN if any element is NaN)."""
    return functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(a)).astype(jnp.float32) for a in jax.tree.leaves(tree)]
    )


class FloatCarry(NamedTuple):
    """Carries the halves as floats, combined by the coupling (the paper's arithmetic)."""

    dtype: Any

    fixed = False

    def enter(self, x: Array) -> Array:
        """A float half -> a carry."""
        return x

    def leave(self, c: Array) -> Array:
        """A carry -> the float half it stands for."""
        return c

    def view(self, c: Array) -> Array:
        """What F/G see of a carry."""
        return c

    def combine(self, cpl: Coupling, c: Array, h: Any) -> Array:
        return cpl.combine(c, h)

    def uncombine(self, cpl: Coupling, c: Array, h: Any) -> Array:
        return cpl.uncombine(c, h)

    def linear(self, fn: Callable, c: Array) -> Array:
        """Applies a linear map that moves or pads elements (a shortcut) to a carry."""
        return fn(c)

    def magnitude(self, c: Array) -> Array:
        return _max_abs(c)


class FixedCarry(NamedTuple):
    """Carries the halves as int32 fixed point with ``frac_bits`` fraction bits.

    ``combine(c, h) = c + q(h)`` with ``q(h) = round(h * 2**frac_bits)``: integer addition, so
    ``uncombine(combine(c, h), h) == c`` bit for bit whenever h is computed the same way twice.
    F and G see ``view(c)``, the carry's value in ``dtype``.
    """

    dtype: Any
    frac_bits: int

    fixed = True

    def enter(self, x: Array) -> Array:
        return quantize(x, self.frac_bits)

    def leave(self, c: Array) -> Array:
        return dequantize(c, self.frac_bits, self.dtype)

    def view(self, c: Array) -> Array:
        return dequantize(c, self.frac_bits, self.dtype)

    def combine(self, cpl: Coupling, c: Array, h: Array) -> Array:
        return c + quantize(h, self.frac_bits)

    def uncombine(self, cpl: Coupling, c: Array, h: Array) -> Array:
        return c - quantize(h, self.frac_bits)

    def linear(self, fn: Callable, c: Array) -> Array:
        return fn(c)

    def magnitude(self, c: Array) -> Array:
        return jnp.max(jnp.abs(c)).astype(jnp.float32) * (2.0**-self.frac_bits)


class TracedFixedCarry(NamedTuple):
    """`FixedCarry` for plain autodiff: the carry is ``(int32 value, float twin)``.

    The twin accumulates the unrounded sum, only to carry the straight-through gradient: what
    F/G see (and the output) is the int32 carry's value, with the twin's derivative. So plain
    autodiff computes the very values of the memory-saving forward.
    """

    dtype: Any
    frac_bits: int

    fixed = True

    def enter(self, x: Array) -> tuple[Array, Array]:
        return quantize(x, self.frac_bits), x

    def leave(self, c: tuple[Array, Array]) -> Array:
        return _straight_through(c[1], dequantize(c[0], self.frac_bits, self.dtype))

    view = leave

    def combine(self, cpl: Coupling, c: tuple, h: Array) -> tuple[Array, Array]:
        return c[0] + quantize(h, self.frac_bits), cpl.combine(c[1], h)

    def uncombine(self, cpl: Coupling, c: tuple, h: Array) -> tuple[Array, Array]:
        return c[0] - quantize(h, self.frac_bits), cpl.uncombine(c[1], h)

    def linear(self, fn: Callable, c: tuple) -> tuple[Array, Array]:
        return fn(c[0]), fn(c[1])

    def magnitude(self, c: tuple) -> Array:
        return jnp.max(jnp.abs(c[0])).astype(jnp.float32) * (2.0**-self.frac_bits)


def make_carry(arithmetic: str, frac_bits: int, dtype: Any, *, traced: bool = False):
    """The carry arithmetic for halves of ``dtype``: `FloatCarry`, `FixedCarry`, or for plain
    autodiff (``traced``) `TracedFixedCarry`."""
    if arithmetic == "float":
        return FloatCarry(jnp.dtype(dtype))
    cls = TracedFixedCarry if traced else FixedCarry
    return cls(jnp.dtype(dtype), frac_bits)


def _in_range(arith, peak: Array | None, *outputs: Array) -> tuple[Array, ...]:
    """With fixed-point carries, NaN outputs when ``peak`` reached the range limit (or is NaN).

    A value beyond the range would have wrapped around; NaN keeps it from passing as a number
    (the reliable signal is the peak itself: see `revjax.check_carry_range`).
    """
    if not arith.fixed:
        return outputs
    ok = peak < carry_limit(arith.frac_bits)  # False for NaN
    return tuple(jnp.where(ok, y, jnp.asarray(jnp.nan, y.dtype)) for y in outputs)


# --------------------------------------------------------------------------------------------
# One unit, forward and inverse (the one definition every scan uses)
# --------------------------------------------------------------------------------------------


def unit_forward(arith, cpl, f_branch, g_branch, fp, gp, key, context, a1, a2, peak=None):
    """One reversible unit on carries: ``b1 = a1 (+) F(a2)``, ``b2 = a2 (+) G(b1)``.

    ``arith`` is the carry arithmetic (`make_carry`), ``f_branch`` / ``g_branch`` the
    normalised residual functions ``(params, x, key, context) -> (h, aux)``, ``key`` the unit's
    key (split into F's and G's). With ``peak`` (a float32 scalar, or None to skip), also
    returns the largest magnitude of the unit's input carries and F/G outputs so far.

    Returns:
      ``((b1, b2), (aux_f, aux_g), peak)``.
    """
    kf, kg = _split_unit_key(key)
    h_f, aux_f = f_branch(fp, arith.view(a2), kf, context)
    b1 = arith.combine(cpl, a1, h_f)
    h_g, aux_g = g_branch(gp, arith.view(b1), kg, context)
    b2 = arith.combine(cpl, a2, h_g)
    if peak is not None:
        parts = (arith.magnitude(a1), arith.magnitude(a2), _max_abs(h_f), _max_abs(h_g))
        peak = functools.reduce(jnp.maximum, parts, peak)
    return (b1, b2), (aux_f, aux_g), peak


def unit_inverse(arith, cpl, f_branch, g_branch, fp, gp, key, context, b1, b2):
    """Inverse of `unit_forward`: ``a2 = b2 (-) G(b1)``, ``a1 = b1 (-) F(a2)`` (aux discarded)."""
    kf, kg = _split_unit_key(key)
    a2 = arith.uncombine(cpl, b2, g_branch(gp, arith.view(b1), kg, context)[0])
    a1 = arith.uncombine(cpl, b1, f_branch(fp, arith.view(a2), kf, context)[0])
    return a1, a2


class SequenceSetting(NamedTuple):
    """The static setting of one sequence's forward and backward scans.

    Attributes:
      coupling: the `Coupling`.
      f: F as a normalised ``_Branch``.
      g: G as a normalised ``_Branch``.
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

    Exact arithmetic (``arithmetic="fixed"``, additive coupling only): inside the sequence the
    halves are carried as int32 fixed point with ``frac_bits`` fraction bits; F and G see the
    carries' values in the halves' dtype, and their outputs are rounded to the grid
    (``q(h) = round(h * 2**frac_bits)``) before the integer addition. So
    ``x1 = y1 - q(F(x2))`` rebuilds the forward's carry bit for bit whenever F gives the same
    bits twice, whatever precision it computes in, and the backward rebuilds from the int32
    output carry the forward saved. The input is rounded to the grid on entry and the output
    is the carry's value in the halves' dtype. Rounding's gradient is the straight-through
    identity; ``memory_saving=False`` computes the same rounded forward. Carries must stay
    below `carry_limit` (16384 with 16 fraction bits): past it the outputs are NaN rather than
    wrapped-around numbers, and ``return_peak`` gives the largest magnitude reached (what
    `revjax.ReversibleSequence` records and the trainer checks: downstream layers compiled by
    XLA may turn NaN back into numbers, so the peak, not the NaN, is the reliable signal).

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
        rounding; ``None`` (default) stores none. Fixed-point arithmetic needs none.
      context: optional side inputs shared by every unit (a pytree of arrays, not stacked),
        passed to F and G as their last argument. Inexact leaves receive gradients summed over
        the units; other leaves (boolean masks, integer positions) get none.
      arithmetic: ``"float"`` (the paper's floating-point rebuild, exact up to rounding) or
        ``"fixed"`` (int32 fixed-point carries, a bit-exact rebuild; additive coupling only).
      frac_bits: fraction bits of the fixed-point carries (grid step ``2**-frac_bits``, range
        ``carry_limit(frac_bits)``).
      return_peak: also return the largest magnitude of any carry and F/G output (float32
        scalar; NaN if any was NaN), to watch the fixed-point range.

    Returns:
      ``(y1, y2)``, or ``((y1, y2), (f_aux, g_aux))`` when ``has_aux``; with ``return_peak``,
      ``(that, peak)``.

    Raises:
      ValueError: unknown coupling or arithmetic, fixed point with the affine coupling, params
        without a common leading axis, a number of keys different from n, a context that is
        not a pytree of arrays, or F/G outputs whose shapes don't fit the halves.
    """
    cpl = get_coupling(coupling)
    check_arithmetic(arithmetic, frac_bits, cpl)
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
    if arithmetic == "fixed" and jnp.result_type(x1) != jnp.result_type(x2):
        raise ValueError(
            "arithmetic='fixed' needs both halves in one dtype, got "
            f"{jnp.result_type(x1)} and {jnp.result_type(x2)}: cast them to the carry dtype."
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
    arith = make_carry(arithmetic, frac_bits, jnp.result_type(x1), traced=not memory_saving)
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
        run = lambda fp, gp, a, b, k, c: _plain_sequence(setting, fp, gp, a, b, k, c, remat)
    (y1, y2), aux, peak = run(f_params, g_params, x1, x2, keys, context)
    out = ((y1, y2), aux) if has_aux else (y1, y2)
    return (out, peak) if return_peak else out


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


def _input_peak(setting: SequenceSetting, x1: Array, x2: Array) -> Array | None:
    # Measured on the float inputs: a NaN input must not vanish into an integer carry.
    return _max_abs((x1, x2)) if setting.track_peak else None


def _scan_forward(
    setting, fp, gp, c1, c2, keys, context=None, peak=None, *, stored_units=None, remat=False
):
    """The forward sequence on carries as one ``lax.scan`` of `unit_forward`.

    Also the plain-autodiff path (with ``remat``, each unit under `jax.checkpoint`).
    ``stored_units``: ``(first, count)`` to also keep the exact input carries of units
    ``first, first + k, ...`` (k = ``setting.exact_every``) in a carried buffer of ``count``
    activations per half, updated in place; see `exact_range`.

    Returns:
      ``((c1, c2), aux, stored, peak)``; ``stored`` is ``(buf1, buf2)`` or None.
    """
    n = _num_units(fp, gp)
    s = setting
    count = 0 if stored_units is None else stored_units[1]
    first, k = (stored_units[0], s.exact_every) if count else (0, 1)
    bufs = (
        (jnp.zeros((count, *c1.shape), c1.dtype), jnp.zeros((count, *c2.shape), c2.dtype))
        if count
        else None
    )  # [count, *half.shape] each

    def body(carry, xs):
        (a1, a2), bufs, peak = carry
        i, p_f, p_g, key = xs
        if bufs is not None:
            keep, slot = exact_slot(i, first, count, k)
            bufs = tuple(
                lax.dynamic_update_index_in_dim(b, jnp.where(keep, a, b[slot]), slot, 0)
                for b, a in zip(bufs, (a1, a2), strict=True)
            )
        (b1, b2), aux, peak = unit_forward(
            s.arith, s.coupling, s.f, s.g, p_f, p_g, key, context, a1, a2, peak
        )
        return ((b1, b2), bufs, peak), aux

    if remat:
        body = jax.checkpoint(body)
    ((y1, y2), bufs, peak), aux = lax.scan(
        body, ((c1, c2), bufs, peak), (jnp.arange(n), fp, gp, keys), unroll=s.unroll
    )
    return (y1, y2), aux, bufs, peak


def _plain_sequence(setting, fp, gp, x1, x2, keys, context, remat=False):
    """Plain autodiff through the forward scan: ``((y1, y2), aux, peak)`` on float halves."""
    arith = setting.arith
    peak = _input_peak(setting, x1, x2)
    (c1, c2), aux, _, peak = _scan_forward(
        setting, fp, gp, arith.enter(x1), arith.enter(x2), keys, context, peak, remat=remat
    )
    y1, y2 = _in_range(arith, peak, arith.leave(c1), arith.leave(c2))
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


def _sequence_backward(setting, fp, gp, y1, y2, keys, context, stored, dy1, dy2, stored_units=None):
    """The memory-saving backward of a sequence: rebuilds its input while pulling back.

    Walks the units in reverse and evaluates G(y1) and F(x2) once each through `jax.vjp`,
    using each primal output both to rebuild the unit's input (``x2 = y2 (-) G(y1)``,
    ``x1 = y1 (-) F(x2)``) and to pull back the cotangent. ``y1, y2`` are carries in
    ``setting.arith`` (int32 for fixed point: the rebuild is then exact); F and G are
    differentiated at the carries' float view, and the combine rule at its float form
    (rounding's gradient is the identity). ``stored``: the exact input carries kept by
    `_scan_forward` (``(buf1, buf2)``) or None; ``stored_units`` as there.

    Returns:
      ``((x1, x2), (dx1, dx2), (df_params, dg_params, dcontext))``: the rebuilt input carries,
      the cotangent of their float view and the cotangents of the parameters and side inputs.
    """
    s, arith, cpl = setting, setting.arith, setting.coupling
    n = _num_units(fp, gp)
    k = s.exact_every
    if stored is not None:
        first, count = exact_range(n, k) if stored_units is None else stored_units
    # Cotangent of the side inputs, summed over units: zeros for inexact leaves, None else.
    dcontext = jax.tree.map(lambda c: jnp.zeros_like(c) if _differentiable(c) else None, context)

    def exact(i, rebuilt, half):
        # With exact_every=k, the inputs of units n-k, n-2k, ... were stored: use them instead
        # of the rebuilt ones, so no chain of rebuilt units is longer than k.
        if stored is None:
            return rebuilt
        keep, slot = exact_slot(i, first, count, k)
        return jnp.where(keep, stored[half][slot], rebuilt)

    def body(carry, xs):
        b1, b2, db1, db2, dctx = carry
        i, p_f, p_g, key = xs
        kf, kg = _split_unit_key(key)
        b1, b2 = _after(b1, b2, db1, db2)
        # G(y1) once: its value rebuilds x2, its VJP pulls back the cotangent of y2.
        # Non-inexact leaves of the parameters and context (RNG counters, masks) get None.
        v1 = arith.view(b1)
        h_g, g_vjp = _vjp_inexact(lambda p, a, c: s.g(p, a, kg, c)[0], p_g, v1, context)
        a2 = exact(i, arith.uncombine(cpl, b2, h_g), 1)
        v2 = arith.view(a2)
        da2, dh_g = jax.vjp(cpl.combine, v2, h_g)[1](db2)
        dgp, db1_from_g, dctx_g = g_vjp(dh_g)
        db1 = db1 + db1_from_g
        # F(x2) once: its value rebuilds x1, its VJP pulls back the cotangent of y1.
        h_f, f_vjp = _vjp_inexact(lambda p, a, c: s.f(p, a, kf, c)[0], p_f, v2, context)
        a1 = exact(i, arith.uncombine(cpl, b1, h_f), 0)
        da1, dh_f = jax.vjp(cpl.combine, arith.view(a1), h_f)[1](db1)
        dfp, da2_from_f, dctx_f = f_vjp(dh_f)
        da2 = da2 + da2_from_f
        dctx = _add_cotangents(dctx, _add_cotangents(dctx_g, dctx_f))
        return (a1, a2, da1, da2, dctx), (dfp, dgp)

    (x1, x2, dx1, dx2, dcontext), (dfp, dgp) = lax.scan(
        body,
        (y1, y2, dy1, dy2, dcontext),
        (jnp.arange(n), fp, gp, keys),
        reverse=True,
        unroll=s.unroll,
    )
    return (x1, x2), (dx1, dx2), (dfp, dgp, dcontext)


def output_residual(arith, outputs: tuple[Array, Array], carries: tuple[Array, Array]) -> Any:
    """What a custom VJP keeps of its output carries, for `output_carries` to restore exactly.

    Float carries are the outputs. Fixed-point carries with float32 outputs are kept as the
    float outputs plus an int8 correction ``c - q(y)``: the outputs are what the next layer's
    autodiff stores anyway (the next stage's rematerialised entry unit, a BatchNorm), so XLA
    keeps one float buffer where int32 carries would be a second copy of the same values, and
    the correction, a quarter of its size, holds the low bits float32 cannot (``|c| < 2**31``
    has at most 7 bits beyond float32's 24: ``|c - q(y)| <= 64``). Other dtypes keep the int32
    carries (float64 would be twice their size, bfloat16 loses too many bits).
    """
    if not arith.fixed or jnp.dtype(arith.dtype) != jnp.float32:
        return carries
    corrections = tuple(
        (c - quantize(y, arith.frac_bits)).astype(jnp.int8)
        for y, c in zip(outputs, carries, strict=True)
    )
    # Materialised here: otherwise XLA fuses the subtraction into the backward's restore,
    # which then reads the int32 carries, kept alive all along.
    return outputs, lax.optimization_barrier(corrections)


def output_carries(arith, saved: Any) -> tuple[Array, Array]:
    """The output carries `output_residual` kept, bit for bit (while they are in range: out of
    range the outputs are NaN, see `_in_range`)."""
    if not arith.fixed or jnp.dtype(arith.dtype) != jnp.float32:
        return saved
    outputs, corrections = saved
    return tuple(
        quantize(y, arith.frac_bits) + r.astype(jnp.int32)
        for y, r in zip(outputs, corrections, strict=True)
    )


def _make_memory_saving(setting: SequenceSetting):
    """Builds the custom-VJP sequence for one static setting: ``((y1, y2), aux, peak)``."""
    arith = setting.arith

    def forward(f_params, g_params, x1, x2, keys, context):
        n = _num_units(f_params, g_params)
        k = setting.exact_every
        plan = None if k is None else exact_range(n, k)
        peak = _input_peak(setting, x1, x2)
        (c1, c2), aux, stored, peak = _scan_forward(
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
        y1, y2 = _in_range(arith, peak, arith.leave(c1), arith.leave(c2))
        return ((y1, y2), aux, peak), (c1, c2, stored)

    @jax.custom_vjp
    def run(f_params, g_params, x1, x2, keys, context):
        return forward(f_params, g_params, x1, x2, keys, context)[0]

    def run_fwd(f_params, g_params, x1, x2, keys, context):
        out, (c1, c2, stored) = forward(f_params, g_params, x1, x2, keys, context)
        # The residuals: parameters, the output carries (exact: for fixed point the backward
        # rebuilds from the int32 carries, not from the rounded float outputs; see
        # `output_residual`), the keys, the side inputs and, with exact_every, the exact input
        # carries of `exact_units`. No other activation.
        saved = output_residual(arith, out[0], (c1, c2))
        return out, (f_params, g_params, saved, keys, context, stored)

    def run_bwd(residuals, cotangents):
        f_params, g_params, saved, keys, context, stored = residuals
        (dy1, dy2), _, _ = cotangents  # aux and peak are not differentiated
        # Restored only once the cotangent exists: left free, XLA computes the int32 carries
        # in the forward pass and keeps them (see `tie_to_cotangent`).
        c1, c2 = output_carries(arith, tie_to_cotangent(saved, (dy1, dy2)))
        _, (dx1, dx2), (dfp, dgp, dcontext) = _sequence_backward(
            setting, f_params, g_params, c1, c2, keys, context, stored, dy1, dy2
        )
        return dfp, dgp, dx1, dx2, None, dcontext

    run.defvjp(run_fwd, run_bwd)
    return run


# --------------------------------------------------------------------------------------------
# reversible_chain: several invertible segments, one custom VJP
# --------------------------------------------------------------------------------------------


class ChainSegment(NamedTuple):
    """One invertible piece of a `reversible_chain`, mapping halves to halves.

    Build them with `sequence_segment` (stacked reversible units) and `shortcut_unit_segment`
    (one unit whose halves change shape through an injective linear shortcut). A segment works
    on carries in the chain's arithmetic ``arith`` (`make_carry`: floats, or int32 fixed
    point).

    Attributes:
      num_units: how many units the segment counts for ``exact_every`` placement.
      forward: ``(params, c1, c2, stored_units, k, arith, peak) -> ((d1, d2), aux, stored,
        peak)``. ``stored_units`` is ``(first, count)`` or None: keep the exact input carries
        of local units ``first, first + k, ...`` (``stored`` holds them; None when nothing is
        kept). ``peak``: a float32 scalar to update with the largest carry / F / G magnitude,
        or None.
      backward: ``(params, stored, d1, d2, dy1, dy2, stored_units, k, arith) -> ((c1, c2),
        (dx1, dx2), dparams)``: rebuilds the segment's input carries from its output carries
        while pulling the cotangent back (using the stored inputs in place of rebuilt ones).
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

    def setting(arith, k):
        check_arithmetic("fixed" if arith.fixed else "float", DEFAULT_FRAC_BITS, cpl)
        return SequenceSetting(cpl, f_branch, g_branch, unroll, arith, k)

    def forward(params, c1, c2, stored_units, k, arith, peak=None):
        fp, gp = params
        return _scan_forward(
            setting(arith, k), fp, gp, c1, c2, None, None, peak, stored_units=stored_units
        )

    def backward(params, stored, d1, d2, dy1, dy2, stored_units, k, arith):
        fp, gp = params
        c, dx, (dfp, dgp, _) = _sequence_backward(
            setting(arith, k), fp, gp, d1, d2, None, None, stored, dy1, dy2, stored_units
        )
        return c, dx, (dfp, dgp)

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
    f_branch, g_branch = _Branch(f, has_aux, False), _Branch(g, has_aux, False)

    def float_combine(x, h):
        p = shortcut(x)
        return p + _cast_like(h, p)

    def forward(params, c1, c2, stored_units, k, arith, peak=None):
        fp, gp = params
        h_f, aux_f = f_branch(fp, arith.view(c2), None)
        d1 = arith.combine(additive_coupling, arith.linear(shortcut, c1), h_f)
        h_g, aux_g = g_branch(gp, arith.view(d1), None)
        d2 = arith.combine(additive_coupling, arith.linear(shortcut, c2), h_g)
        if peak is not None:
            parts = (arith.magnitude(c1), arith.magnitude(c2), _max_abs(h_f), _max_abs(h_g))
            peak = functools.reduce(jnp.maximum, parts, peak)
        keep = stored_units is not None and stored_units[1]
        return (d1, d2), (aux_f, aux_g), ((c1, c2) if keep else None), peak

    def backward(params, stored, d1, d2, dy1, dy2, stored_units, k, arith):
        fp, gp = params
        d1, d2 = _after(d1, d2, dy1, dy2)
        h_g, g_vjp = _vjp_inexact(lambda p, a: g_branch(p, a, None)[0], gp, arith.view(d1))
        if stored is None:
            c2 = shortcut_inverse(arith.uncombine(additive_coupling, d2, h_g))
        else:
            c2 = stored[1]
        dx2, dh_g = jax.vjp(float_combine, arith.view(c2), h_g)[1](dy2)
        dgp, dy1_from_g = g_vjp(dh_g)
        dy1 = dy1 + dy1_from_g
        # F's recomputation may not start before G's pullback is done: left free, XLA:GPU
        # overlaps them and holds both branches' full-size buffers at once. A barrier moves no
        # data and computes nothing. dx2 stays out of it: forced early, it would live through
        # F's pullback.
        c2, dy1 = lax.optimization_barrier((c2, dy1))
        h_f, f_vjp = _vjp_inexact(lambda p, a: f_branch(p, a, None)[0], fp, arith.view(c2))
        if stored is None:
            c1 = shortcut_inverse(arith.uncombine(additive_coupling, d1, h_f))
        else:
            c1 = stored[0]
        dx1, dh_f = jax.vjp(float_combine, arith.view(c1), h_f)[1](dy1)
        dfp, dx2_from_f = f_vjp(dh_f)
        return (c1, c2), (dx1, dx2 + dx2_from_f), (dfp, dgp)

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
    plans = chain_exact_units(segments, exact_every if memory_saving else None)
    arith = make_carry(arithmetic, frac_bits, jnp.result_type(x1), traced=not memory_saving)
    track = return_peak or arith.fixed

    def forward(params, x1, x2, keep):
        auxes, stored, peaks = [], [], []
        c1, c2 = arith.enter(x1), arith.enter(x2)
        peak = _max_abs((x1, x2)) if track else None
        for seg, p, plan in zip(segments, params, plans, strict=True):
            seg_peak = jnp.zeros((), jnp.float32) if track else None
            (c1, c2), aux, s, seg_peak = seg.forward(
                p, c1, c2, plan if keep else None, exact_every, arith, seg_peak
            )
            auxes.append(aux)
            stored.append(s)
            peaks.append(seg_peak)
            peak = jnp.maximum(peak, seg_peak) if track else None
        y1, y2 = _in_range(arith, peak, arith.leave(c1), arith.leave(c2))
        return ((y1, y2), tuple(auxes), tuple(peaks)), (c1, c2, tuple(stored))

    def finish(out):
        (y1, y2), aux, peaks = out
        return (((y1, y2), aux), peaks) if return_peak else ((y1, y2), aux)

    if not memory_saving:
        return finish(forward(params, x1, x2, False)[0])

    @jax.custom_vjp
    def run(params, x1, x2):
        return forward(params, x1, x2, False)[0]

    def run_fwd(params, x1, x2):
        out, (c1, c2, stored) = forward(params, x1, x2, True)
        # The residuals: parameters, the chain's output carries and the inputs
        # `chain_exact_units` names. No segment's output: each is rebuilt from the next one.
        return out, (params, c1, c2, stored)

    def run_bwd(residuals, cotangents):
        params, c1, c2, stored = residuals
        (dy1, dy2), _, _ = cotangents  # aux and peaks are not differentiated
        dparams = [None] * len(segments)
        for j in reversed(range(len(segments))):
            (c1, c2), (dy1, dy2), dparams[j] = segments[j].backward(
                params[j], stored[j], c1, c2, dy1, dy2, plans[j], exact_every, arith
            )
        return tuple(dparams), dy1, dy2

    run.defvjp(run_fwd, run_bwd)
    return finish(run(params, x1, x2))


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
    n = _num_units(f_params, g_params)
    if unroll is None:
        unroll = default_unroll(n)
    if context is not None:
        _check_context(context)
    f_branch = _Branch(f, has_aux, keys is not None, context is not None)
    g_branch = _Branch(g, has_aux, keys is not None, context is not None)
    arith = make_carry(arithmetic, frac_bits, jnp.result_type(y1))

    def body(carry, xs):
        fp, gp, key = xs
        return unit_inverse(arith, cpl, f_branch, g_branch, fp, gp, key, context, *carry), None

    (c1, c2), _ = lax.scan(
        body,
        (arith.enter(y1), arith.enter(y2)),
        (f_params, g_params, keys),
        reverse=True,
        unroll=unroll,
    )
    return arith.leave(c1), arith.leave(c2)


def relative_error(a: PyTree, b: PyTree) -> Array:
    """Global relative error ``||a - b|| / max(||b||, tiny)`` over all leaves of two pytrees."""
    diff = sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    ref = sum(jnp.sum(jnp.square(y)) for y in jax.tree.leaves(b))
    tiny = math.sqrt(float(jnp.finfo(jnp.result_type(*jax.tree.leaves(b))).tiny))
    return jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(ref), tiny)
