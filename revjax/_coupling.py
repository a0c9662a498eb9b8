"""Couplings (how a branch output updates a half) and the split of an input into halves.

A `Coupling` is pure math on arrays: ``combine`` is one half's forward rule and ``uncombine``
its inverse. The additive and affine couplings are defined here, with `split_halves` /
`merge_halves`, which cut a tensor into the two halves a reversible unit works on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


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


def cast_like(h: Array, x: Array) -> Array:
    # The carry keeps its own dtype: a bfloat16 branch added to a float32 half stays float32,
    # which is what keeps the reconstruction in float32 under mixed precision.
    return h.astype(x.dtype)


def _additive_combine(x: Array, h: Array) -> Array:
    return x + cast_like(h, x)


def _additive_uncombine(y: Array, h: Array) -> Array:
    return y - cast_like(h, y)


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
    return affine_scale(cast_like(log_scale, x)), cast_like(shift, x)


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
