"""Carry arithmetic: the halves inside a sequence as floats or as int32 fixed point.

`make_carry` picks `FloatCarry` (the paper's floating-point rebuild, exact up to rounding),
`FixedCarry` (int32 carries with ``frac_bits`` fraction bits: a bit-exact rebuild) or, for
plain autodiff, `TracedFixedCarry`. Also the fixed point's range (`carry_limit`,
`CarryRangeError`, `in_range`), the checks of the ``arithmetic`` / ``frac_bits`` settings, and
what a custom VJP keeps of its output carries (`output_residual`, restored by `output_carries`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from revjax._coupling import Coupling
from revjax._platform import target_platform

Array = jax.Array
PyTree = Any


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
        # The fewest fraction bits removed that leave the peak at most half the new range.
        needed = math.ceil(math.log2(max(self.peak, 1.0) * 2 / limit)) if math.isfinite(
            self.peak) else frac_bits
        fewer = max(frac_bits - max(needed, 1), 0)
        if fewer < frac_bits and carry_limit(fewer) > self.peak:
            hint = (f"Use fewer fraction bits (frac_bits={fewer} widens the range "
                    f"{2 ** (frac_bits - fewer):g}-fold, to {carry_limit(fewer):g}), ")
        else:
            hint = "No frac_bits holds it; "
        super().__init__(
            f"Fixed-point carries of {where} reached |value| = {self.peak:.6g}, beyond the "
            f"range {limit:g} that frac_bits={frac_bits} allows (int32 with {frac_bits} fraction "
            f"bits would wrap around). {hint}look for exploding weights or activations (a lower "
            "learning rate), or use arithmetic='float'."
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


REBUILDS = ("isolated", "pullback")


def check_rebuild_mode(rebuild: Any, owner: str = "") -> None:
    """Raises a ValueError unless ``rebuild`` is ``"isolated"`` or ``"pullback"``."""
    if rebuild not in REBUILDS:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(
            f"{prefix}unknown rebuild {rebuild!r}; use 'isolated' (fixed-point rebuilds "
            "evaluate F and G as the forward did: bit for bit on any compiler) or 'pullback' "
            "(the rebuild reuses the pullback's recomputation: on GPU and TPU one F and G "
            "evaluation fewer per unit; exact where XLA compiles both alike)."
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


def max_abs(tree: PyTree) -> Array:
    """Largest ``|leaf|`` over the leaves of ``tree``, float32 (NaN if any element is NaN)."""
    return functools.reduce(
        jnp.maximum,
        [jnp.max(jnp.abs(a), initial=0).astype(jnp.float32) for a in jax.tree.leaves(tree)],
    )


class FloatCarry(NamedTuple):
    """Carries the halves as floats, combined by the coupling (the paper's arithmetic)."""

    dtype: Any

    fixed = False
    traced = False

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
        return max_abs(c)


class FixedCarry(NamedTuple):
    """Carries the halves as int32 fixed point with ``frac_bits`` fraction bits.

    ``combine(c, h) = c + q(h)`` with ``q(h) = round(h * 2**frac_bits)``: integer addition, so
    ``uncombine(combine(c, h), h) == c`` bit for bit whenever h is computed the same way twice.
    F and G see ``view(c)``, the carry's value in ``dtype``. ``isolate``: the units evaluate F
    and G through `revjax._units.isolated_branch` (``rebuild="isolated"``), so that the rebuild
    computes them as the forward did; False rebuilds from the pullback's own recomputation
    (``rebuild="pullback"``).
    """

    dtype: Any
    frac_bits: int
    isolate: bool = True

    fixed = True
    traced = False

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
        return jnp.max(jnp.abs(c), initial=0).astype(jnp.float32) * (2.0**-self.frac_bits)


class TracedFixedCarry(NamedTuple):
    """`FixedCarry` for plain autodiff: the carry is ``(int32 value, float twin)``.

    The twin accumulates the unrounded sum, only to carry the straight-through gradient: what
    F/G see (and the output) is the int32 carry's value, with the twin's derivative. So plain
    autodiff computes the very values of the memory-saving forward.
    """

    dtype: Any
    frac_bits: int

    fixed = True
    traced = True

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
        return jnp.max(jnp.abs(c[0]), initial=0).astype(jnp.float32) * (2.0**-self.frac_bits)


def check_carry_dtype(arithmetic: str, dtype: Any) -> None:
    """Raises a TypeError for fixed point on halves that are not floating point."""
    if arithmetic == "fixed" and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"Fixed-point carries need floating-point halves, got {jnp.dtype(dtype)} halves. "
            "Cast them to float32 (or bfloat16) first, e.g. x1.astype(jnp.float32)."
        )


def make_carry(
    arithmetic: str, frac_bits: int, dtype: Any, *, traced: bool = False, rebuild: str = "isolated"
):
    """The carry arithmetic for halves of ``dtype``: `FloatCarry`, `FixedCarry` (evaluating F
    and G in isolation unless ``rebuild="pullback"``), or for plain autodiff (``traced``)
    `TracedFixedCarry`.

    Raises:
      TypeError: fixed point on halves that are not floating point.
    """
    if arithmetic == "float":
        return FloatCarry(jnp.dtype(dtype))
    check_carry_dtype(arithmetic, dtype)
    if traced:
        return TracedFixedCarry(jnp.dtype(dtype), frac_bits)
    return FixedCarry(jnp.dtype(dtype), frac_bits, rebuild == "isolated")


def in_range(arith, peak: Array | None, *outputs: Array) -> tuple[Array, ...]:
    """With fixed-point carries, NaN outputs when ``peak`` reached the range limit (or is NaN).

    A value beyond the range would have wrapped around; NaN keeps it from passing as a number
    (the reliable signal is the peak itself: see `revjax.check_carry_range`).
    """
    if not arith.fixed:
        return outputs
    ok = peak < carry_limit(arith.frac_bits)  # False for NaN
    return tuple(jnp.where(ok, y, jnp.asarray(jnp.nan, y.dtype)) for y in outputs)


def output_residual(
    arith, outputs: tuple[Array, Array], carries: tuple[Array, Array]
) -> tuple[tuple[Array, Array], Any]:
    """What a custom VJP keeps of its output carries, for `output_carries` to restore exactly,
    and the outputs it returns: ``(outputs, saved)``.

    Float carries are the outputs. Fixed-point carries with float32 outputs are kept as the
    float outputs plus an int8 correction ``c - q(y)``: the outputs are what the next layer's
    autodiff stores anyway (the next stage's rematerialised entry unit, a BatchNorm), so XLA
    keeps one float buffer where int32 carries would be a second copy of the same values, and
    the correction, a quarter of its size, holds the low bits float32 cannot (an int32 carry
    has at most 7 significant bits beyond float32's 24: ``|c - q(y)| <= 64``). Other dtypes
    keep the int32 carries (float64 outputs would be twice their size, bfloat16 ones lose
    too many bits).

    The corrections are materialised behind an optimisation barrier: otherwise XLA fuses the
    subtraction into the backward's restore, which then reads the int32 carries, kept alive all
    along. For a TPU (`target_platform`) the float outputs pass through the same barrier and the
    layer returns those: XLA:TPU otherwise fuses the outputs' dequantisation into their uses,
    and the int32 carries stay alive to the backward beside them. By libtpu's own accounting
    of the step's HBM (`peak_memory_in_bytes`, what its compile-time out-of-memory check uses)
    that lowers RevNet-164's train step on a TPU v5e; on GPUs it raises the temporary bytes
    XLA allocates, so there the outputs stay outside the barrier.
    """
    if not arith.fixed or jnp.dtype(arith.dtype) != jnp.float32:
        return outputs, carries
    corrections = tuple(
        (c - quantize(y, arith.frac_bits)).astype(jnp.int8)
        for y, c in zip(outputs, carries, strict=True)
    )
    if target_platform() == "tpu":
        outputs, corrections = lax.optimization_barrier((tuple(outputs), corrections))
    else:
        corrections = lax.optimization_barrier(corrections)
    return outputs, (outputs, corrections)


def output_carries(arith, saved: Any) -> tuple[Array, Array]:
    """The output carries `output_residual` kept, bit for bit (while they are in range: out of
    range the outputs are NaN, see `in_range`)."""
    if not arith.fixed or jnp.dtype(arith.dtype) != jnp.float32:
        return saved
    outputs, corrections = saved
    return tuple(
        quantize(y, arith.frac_bits) + r.astype(jnp.int32)
        for y, r in zip(outputs, corrections, strict=True)
    )
