"""`ReversibleSequence`: reversible units for any Flax NNX model.

A ``ReversibleSequence`` holds ``num_units`` copies of two NNX modules F and G, their weights
stacked on a leading axis, and applies them as reversible units to two halves::

    y1 = x1 + F(x2, *context)
    y2 = x2 + G(y1, *context)

through one `revjax.reversible_sequence` (one ``lax.scan``, one custom VJP): the backward pass
rebuilds every unit's input from its output instead of storing it, so activation memory does not
grow with ``num_units``. What every NNX model needs is handled here:

* **Mutable state** (BatchNorm batch statistics, RNG counters, anything F/G write to a
  non-``Param`` variable) comes out of the forward pass only and is written back once per call,
  exactly as a plain forward would; the backward recomputation's copy is discarded.
* **Randomness** (``nnx.Dropout``, drop-path, attention dropout): the recomputation starts from
  the same RNG state as the forward, so every unit draws the same masks and the gradients equal
  plain autodiff's with the same RNG.
* **Side inputs** (``context``: conditioning, attention masks or biases, time embeddings) are
  shared by every unit and receive gradients, summed over units.

* **Exact arithmetic** (``arithmetic="fixed"``): the halves are carried as int32 fixed point
  inside the sequence, so the backward rebuilds them bit for bit; the largest magnitude they
  reach is kept in a `CarryPeak` variable, and `check_carry_range` names a sequence whose
  carries left the range. Every backward pass counts the units whose rebuild differed from the
  forward (the gradient of the `RebuildMismatches` variable): `record_rebuild_mismatches`
  adds the count to the model, `check_rebuild` warns once and names the layer.

`pure_call` is the pure form of any NNX module's call, ``(state, *args) -> (output,
new_state)``, that the sequence gives the core for F and G; the model zoo and training steps use
it too.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from revjax._carry import (
    DEFAULT_FRAC_BITS,
    CarryRangeError,
    carry_limit,
    check_arithmetic,
    check_rebuild_mode,
)
from revjax._coupling import Coupling, get_coupling
from revjax._sequence import check_exact_every, reversible_sequence

Array = jax.Array

__all__ = [
    "CarryPeak",
    "RebuildMismatchWarning",
    "RebuildMismatches",
    "ReversibleSequence",
    "check_carry_range",
    "check_rebuild",
    "pure_call",
    "rebuild_mismatches",
    "record_rebuild_mismatches",
    "stacked",
]


class CarryPeak(nnx.BatchStat):
    """The largest magnitude a module's fixed-point carries reached (a running maximum).

    Written by the forward pass, like BatchNorm statistics (so it travels with them: in
    ``batch_stats`` of `revjax.functional` and the trainer's state), with the fraction bits as
    metadata. NaN values (a non-finite activation) are not recorded: they are not a range
    problem.
    """


def new_carry_peak(frac_bits: int) -> CarryPeak:
    """A fresh `CarryPeak` (0) for carries with ``frac_bits`` fraction bits."""
    return CarryPeak(jnp.zeros((), jnp.float32), frac_bits=frac_bits)


def record_peak(variable: CarryPeak, peak: Array) -> None:
    """Raises ``variable`` to ``peak`` if larger (NaN ignored)."""
    variable[...] = jnp.fmax(variable[...], peak)


def check_carry_range(tree: Any) -> None:
    """Raises `revjax.CarryRangeError` if any fixed-point carry in ``tree`` left its range.

    ``tree``: a model (NNX module) or a pytree holding its `CarryPeak` variables (e.g. the
    ``batch_stats`` State of `revjax.functional` or of the trainer). The error names the first
    module path whose carries reached `revjax.carry_limit` of their fraction bits, the largest
    magnitude seen and the fix. Does nothing when every carry is in range (or there are none).
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, CarryPeak)
    is_var = lambda x: isinstance(x, nnx.Variable)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]:
        if not isinstance(leaf, CarryPeak):
            continue
        frac_bits = leaf.get_metadata().get("frac_bits", DEFAULT_FRAC_BITS)
        peak = float(np.asarray(jax.device_get(leaf.get_value())))
        if peak >= carry_limit(frac_bits):
            where = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            raise CarryRangeError(where or "the model", peak, frac_bits)


class RebuildMismatches(nnx.BatchStat):
    """Units whose fixed-point rebuild differed from the forward: a running count (float32).

    The backward pass of a fixed-point sequence compares, unit by unit, checksums of the F and
    G outputs it rebuilds with those of the forward, and gives the number of units that differ
    as the *gradient* of this variable (its value is not used by the call). So a training step
    that differentiates it (``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Any(nnx.Param,
    revjax.RebuildMismatches)))``) gets this step's count in its gradients
    (`rebuild_mismatches`), and `record_rebuild_mismatches` adds it to the model's running
    count, which `check_rebuild` reads. A BatchStat, so it travels with the
    batch statistics (checkpoints, ``batch_stats`` of the trainer).
    """


class RebuildMismatchWarning(RuntimeWarning):
    """A fixed-point sequence's backward rebuilt some unit differently from its forward: the
    rebuilt activations (and the gradients through them) are no longer bit for bit."""


def new_rebuild_mismatches() -> RebuildMismatches:
    """A fresh `RebuildMismatches` count (0)."""
    return RebuildMismatches(jnp.zeros((), jnp.float32))


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _mismatch_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(module path, value)`` of every `RebuildMismatches` in a model, State or gradients."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, RebuildMismatches)
    is_var = lambda x: isinstance(x, nnx.Variable)
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]:
        if isinstance(leaf, RebuildMismatches):
            found.append((_path_name(path), leaf.get_value()))
    return found


def rebuild_mismatches(tree: Any) -> dict[str, float]:
    """The `RebuildMismatches` counts in ``tree``, by module path.

    ``tree``: gradients that include the `RebuildMismatches` variables (this step's counts),
    or a model / State (the running counts `record_rebuild_mismatches` keeps). Host values:
    call it outside `jax.jit`. Empty when the model has no fixed-point sequence.
    """
    return {path: float(np.asarray(jax.device_get(v))) for path, v in _mismatch_leaves(tree)}


def record_rebuild_mismatches(model: nnx.Module, grads: Any) -> Array:
    """Adds this step's counts (from ``grads``) to ``model``'s `RebuildMismatches` variables.

    Traceable (call it inside your jitted step, next to the optimizer update). ``grads``: the
    gradients of a step that differentiated the `RebuildMismatches` variables (see there).

    Returns:
      The step's total count (float32 scalar), e.g. to log.
    """
    counts = nnx.state(grads, RebuildMismatches) if isinstance(grads, nnx.Module) else grads
    step = {path: v for path, v in _mismatch_leaves(counts)}
    total = jnp.zeros((), jnp.float32)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, RebuildMismatches):
            name = _path_name(path)
            if name in step:
                variable[...] = variable[...] + step[name]
                total = total + step[name]
    return total


def add_rebuild_counts(stats: nnx.State, counts: nnx.State) -> tuple[nnx.State, Array]:
    """For a training step on pure States: ``stats`` (non-parameter variables) with the
    step's counts added to its `RebuildMismatches`, and the step's total.

    ``counts``: the gradient of ``nnx.split_state(stats, RebuildMismatches, ...)[0]`` (the
    variables the step differentiated beside the parameters).
    """
    old, rest = nnx.split_state(stats, RebuildMismatches, ...)
    total = sum((jnp.sum(c) for c in jax.tree.leaves(counts)), jnp.zeros((), jnp.float32))
    return nnx.merge_state(rest, jax.tree.map(jnp.add, old, counts)), total


_WARNED: set[str] = set()


def check_rebuild(tree: Any) -> dict[str, float]:
    """Warns (`RebuildMismatchWarning`, once per layer in a process) where a fixed-point
    rebuild differed from the forward, naming the layer and what to do.

    ``tree``: a model or a State holding its `RebuildMismatches` running counts (e.g. the
    trainer's ``batch_stats``), or a step's gradients. Returns the non-zero counts by path.
    """
    bad = {path: n for path, n in rebuild_mismatches(tree).items() if n}
    new = sorted(path for path in bad if path not in _WARNED)
    if new:
        _WARNED.update(new)
        listed = ", ".join(f"{path} ({bad[path]:g} unit rebuilds)" for path in new)
        warnings.warn(
            f"Fixed-point rebuilds differed from the forward at {listed}: the backward "
            "computed F or G with different bits than the forward, so those units' rebuilt "
            "activations and the gradients below them are off by grid steps. With "
            "rebuild='pullback', use rebuild='isolated' (the default, which evaluates F and G "
            "as the forward did); otherwise F or G is not deterministic (an op whose result "
            "varies between runs, e.g. non-deterministic GPU reductions: set "
            "XLA_FLAGS=--xla_gpu_deterministic_ops=true), or use arithmetic='float' with "
            "exact_every.",
            RebuildMismatchWarning,
            stacklevel=2,
        )
    return bad


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """Builds ``n`` copies of a module with independent weights, stacked on a leading axis.

    The NNX scan-over-layers pattern: every Variable of the result (Param, BatchStat, RNG key
    and counter) has a leading axis of length n, and slice i is the i-th unit. Every RNG stream
    of ``rngs`` is split, so each unit gets its own initial weights and its own dropout stream.
    """

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return build(rngs)


def pure_call(
    graphdef: nnx.GraphDef, method: str | Callable[..., Any] | None = None
) -> Callable[..., tuple[Any, nnx.State]]:
    """A module's call as a pure function of its state: ``(state, *args, **kwargs) ->
    (output, new_state)``, for `jax.jit`, `jax.vjp`, `lax.scan` and custom VJPs.

    ``state`` is the module's state (one `nnx.State`, or a tuple of them, e.g. ``(params,
    batch_stats)`` from ``nnx.split(model, nnx.Param, ...)``); ``new_state`` is everything but
    the parameters after the call (batch statistics, RNG counters: what the call may change),
    for `nnx.update`. The module is merged from a copy of ``state``, so the call never writes
    into the caller's arrays: without the copy, a BatchNorm inside `jax.vjp` or `jax.jit` would
    mutate a State from another trace level. A recomputation from the same state therefore
    behaves exactly as the first call (the same batch statistics, the same dropout masks).

    Example::

        graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
        call = revjax.pure_call(graphdef)
        logits, new_stats = jax.jit(call, static_argnames="train")(
            (params, batch_stats), x, train=True
        )

    Args:
      graphdef: the module's graph definition (from `nnx.split`).
      method: what to call on the merged module: ``None`` (the module itself), a method name,
        or a function ``(module, *args, **kwargs) -> output``.
    """

    def call(state: nnx.State | tuple, *args: Any, **kwargs: Any) -> tuple[Any, nnx.State]:
        states = tuple(state) if isinstance(state, tuple | list) else (state,)
        module = nnx.merge(graphdef, *states, copy=True)
        if method is None:
            out = module(*args, **kwargs)
        elif isinstance(method, str):
            out = getattr(module, method)(*args, **kwargs)
        else:
            out = method(module, *args, **kwargs)
        return out, nnx.state(module, nnx.Not(nnx.Param))

    return call


def _unit_builder(make: Callable, what: str) -> Callable[[nnx.Rngs], nnx.Module]:
    """``make`` as a callable of ``rngs`` alone: as it is when it takes ``rngs`` positionally,
    wrapped when it takes it by keyword only (the NNX convention ``__init__(self, *, rngs)``);
    a TypeError saying how to wrap it when it needs other arguments too."""
    if isinstance(make, type):  # a class: its metaclass hides __init__'s signature
        signature = inspect.signature(functools.partial(make.__init__, None))
    elif isinstance(make, functools.partial) and isinstance(make.func, type):
        signature = inspect.signature(
            functools.partial(make.func.__init__, None, *make.args, **make.keywords)
        )
    else:
        try:
            signature = inspect.signature(make)
        except (TypeError, ValueError):  # no signature to read (a builtin): call as documented
            return make
    probe = object()
    try:
        signature.bind(probe)
        return make
    except TypeError:
        pass
    try:
        signature.bind(rngs=probe)
    except TypeError:
        name = getattr(make, "__name__", type(make).__name__)
        call = f"{name}(..., rngs=rngs)" if name.isidentifier() else "YourModule(..., rngs=rngs)"
        raise TypeError(
            f"{what} must build one unit from the RNG streams alone, called as {what}(rngs) "
            f"or {what}(rngs=rngs), but {name}{signature} needs more arguments. Wrap it so "
            f"that rngs is the only one: {what}=lambda rngs: {call}."
        ) from None
    return lambda rngs: make(rngs=rngs)


class ReversibleSequence(nnx.Module):
    """``num_units`` reversible units whose F and G are any NNX modules, memory flat in depth.

    Unit i maps halves ``(x1, x2)`` to ``y1 = x1 (+) F_i(x2, *context, **kwargs)``,
    ``y2 = x2 (+) G_i(y1, *context, **kwargs)``, where ``(+)`` is the coupling (``+`` for the
    additive one). F and G must map a half onto the shape of the other half (so, no stride).

    Example::

        class Attention(nnx.Module):  # F: any module of (x, *context, **kwargs)
            def __init__(self, rngs):
                self.norm = nnx.LayerNorm(64, rngs=rngs)
                self.attn = nnx.MultiHeadAttention(4, 64, dropout_rate=0.1, decode=False,
                                                   rngs=rngs)
            def __call__(self, x, mask, *, deterministic):
                return self.attn(self.norm(x), mask=mask, deterministic=deterministic)

        seq = revjax.ReversibleSequence(Attention, make_mlp, 12, rngs=nnx.Rngs(0, dropout=1))
        y1, y2 = seq(x1, x2, mask, deterministic=False)

    Args:
      make_f: ``rngs -> nnx.Module``, builds one unit's F; traced once under `nnx.vmap` over
        ``num_units`` split RNG streams, so every unit has its own weights and RNG streams.
        Called as ``make_f(rngs)``, or ``make_f(rngs=rngs)`` when it takes ``rngs`` by keyword
        only (a module class with ``__init__(self, *, rngs)``); wrap a module that needs other
        arguments: ``lambda rngs: Attention(64, rngs=rngs)``.
        F is called as ``f(x, *context, **kwargs)``. Give RNG-using layers (``nnx.Dropout``,
        ``nnx.MultiHeadAttention`` with dropout) their ``rngs`` here, at construction.
      make_g: the same for G.
      num_units: number of reversible units, at least 1.
      rngs: initialisation RNG streams (``params``, and ``dropout`` etc. when F/G use them).
      coupling: ``"additive"``, ``"affine"`` (F and G return ``(log_scale, shift)``) or a
        `revjax.Coupling`.
      memory_saving: rebuild activations in the backward pass (one custom VJP); ``False`` runs
        the same parameters through plain autodiff (the reference for tests and benchmarks).
        A plain attribute: set ``seq.memory_saving = False`` to switch.
      exact_every: with memory saving, also store the exact input of every k-th unit, so
        reconstruction error accumulates over at most k units (memory grows with
        ``num_units / k``); ``None`` stores none. See `revjax.reversible_sequence`.
      unroll: scan unroll; ``None``: full on CPU, rolled on GPU/TPU (`revjax.default_unroll`).
      arithmetic: ``"float"`` (the paper's floating-point rebuild) or ``"fixed"``: the halves
        are carried as int32 fixed point with ``frac_bits`` fraction bits inside the sequence,
        so the backward rebuilds them bit for bit (see `revjax.reversible_sequence`; additive
        coupling only). Then ``carry_peak`` (a `CarryPeak`) records the largest magnitude the
        carries reach; past `revjax.carry_limit` the outputs are NaN and `check_carry_range`
        (which the trainer calls at every log step) raises `revjax.CarryRangeError` naming
        this module.
      frac_bits: fraction bits of the fixed-point carries.
      rebuild: with fixed point, how the backward rebuilds F and G's outputs: ``"isolated"``
        (default: evaluated as the forward evaluates them, bit for bit on any backend) or
        ``"pullback"`` (reusing the pullback's recomputation: on GPU and TPU one F and G evaluation
        fewer per unit; exact only where XLA compiles both alike). Either way
        ``rebuild_mismatches`` (a `RebuildMismatches`) receives, as its gradient, the number of
        units whose rebuild differed (see `check_rebuild`). A plain attribute, like
        ``memory_saving``.

    Call:
      ``seq(x1, x2, *context, **kwargs) -> (y1, y2)``. ``context``: arrays (or pytrees of
      arrays) passed to every unit's F and G after the half; their floating leaves receive
      gradients, summed over units. ``kwargs``: static options passed to F and G (``train=``,
      ``deterministic=``); they must be hashable Python values, not arrays.

    Mutable state: whatever F and G change during the call (BatchNorm running averages, RNG
    counters) is written back once, from the forward pass.
    """

    def __init__(
        self,
        make_f: Callable[[nnx.Rngs], nnx.Module],
        make_g: Callable[[nnx.Rngs], nnx.Module],
        num_units: int,
        *,
        rngs: nnx.Rngs,
        coupling: str | Coupling = "additive",
        memory_saving: bool = True,
        exact_every: int | None = None,
        unroll: int | bool | None = None,
        arithmetic: str = "float",
        frac_bits: int = DEFAULT_FRAC_BITS,
        rebuild: str = "isolated",
    ):
        try:
            n = operator.index(num_units)
        except TypeError:
            n = None
        if n is None or isinstance(num_units, bool) or n < 1:
            raise ValueError(
                f"ReversibleSequence needs num_units >= 1 (an int), got {num_units!r}. For no "
                "reversible units, leave the sequence out."
            )
        if not (callable(make_f) and callable(make_g)):
            raise TypeError(
                "make_f and make_g must be callables rngs -> nnx.Module that build one unit's F "
                f"and G (e.g. a Module class or a lambda rngs: ...), got {type(make_f).__name__} "
                f"and {type(make_g).__name__}."
            )
        make_f = _unit_builder(make_f, "make_f")
        make_g = _unit_builder(make_g, "make_g")
        # An unknown name (or fixed point with the affine coupling) fails here, not at the
        # first call.
        check_arithmetic(arithmetic, frac_bits, get_coupling(coupling), "ReversibleSequence")
        check_exact_every(exact_every)
        check_rebuild_mode(rebuild, "ReversibleSequence")
        self.num_units = n
        self.coupling = coupling
        self.memory_saving = memory_saving
        self.exact_every = exact_every
        self.unroll = unroll
        self.arithmetic = arithmetic
        self.frac_bits = frac_bits
        self.rebuild = rebuild
        fixed = arithmetic == "fixed"
        self.carry_peak = new_carry_peak(frac_bits) if fixed else None
        self.rebuild_mismatches = new_rebuild_mismatches() if fixed else None
        self.f = stacked(n, make_f, rngs)
        self.g = stacked(n, make_g, rngs)

    def __call__(self, x1: Array, x2: Array, *context: Any, **kwargs: Any) -> tuple[Array, Array]:
        """Applies the units: halves ``(x1, x2) -> (y1, y2)``, shapes unchanged.

        Args:
          x1: first half (what F's output is added to); e.g. ``[N, L, D]`` or ``[N, H, W, C/2]``.
          x2: second half (F's input, what G's output is added to).
          *context: side inputs shared by every unit, passed to F and G after the half.
          **kwargs: static keyword options passed to F and G.

        Raises:
          ValueError: F or G outputs that do not fit the halves, or a context that is not made
            of arrays.
        """
        return self.call_with(
            x1,
            x2,
            context,
            kwargs,
            memory_saving=self.memory_saving,
            exact_every=self.exact_every,
            unroll=self.unroll,
        )

    def call_with(
        self,
        x1: Array,
        x2: Array,
        context: tuple,
        kwargs: dict[str, Any],
        *,
        memory_saving: bool,
        exact_every: int | None,
        unroll: int | bool | None,
    ) -> tuple[Array, Array]:
        """The call with every setting explicit, for a container that owns the settings (a
        RevNet stage, a RevViT): they override the sequence's own attributes for this call.

        Args:
          x1: first half, as in `__call__`.
          x2: second half.
          context: the side inputs, as a tuple (``seq(x1, x2, *context)``).
          kwargs: the static keyword options for F and G, as a dict.
          memory_saving: rebuild activations in the backward (custom VJP) or plain autodiff.
          exact_every: with memory saving, store every k-th unit's exact input (or ``None``).
          unroll: scan unroll (``None``: `revjax.default_unroll`).

        Returns:
          ``(y1, y2)``; raises as `__call__`.
        """
        check_exact_every(exact_every)
        for i, item in enumerate(context):
            is_nnx = lambda a: isinstance(a, nnx.Module | nnx.Variable)
            if any(is_nnx(leaf) for leaf in jax.tree.leaves(item, is_leaf=is_nnx)):
                raise ValueError(
                    f"context argument {i} holds an NNX Module or Variable; context must be a "
                    "pytree of arrays. Call the module first and pass its output, or make it a "
                    "submodule of F/G (built by make_f / make_g)."
                )
        for name, value in kwargs.items():
            if any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(value)):
                raise ValueError(
                    f"Keyword argument {name}= of ReversibleSequence is an array; keyword "
                    "arguments are static options (train=, deterministic=). Pass arrays "
                    "positionally, as context: seq(x1, x2, *context)."
                )
        f_def, f_state = nnx.split(self.f)
        g_def, g_state = nnx.split(self.g)
        # F and G as the core wants them: ``(state, x, context) -> (h, new_state)``.
        f_call, g_call = pure_call(f_def), pure_call(g_def)
        fixed = self.arithmetic == "fixed"
        out = reversible_sequence(
            lambda state, x, context: f_call(state, x, *context, **kwargs),
            lambda state, x, context: g_call(state, x, *context, **kwargs),
            f_state,
            g_state,
            x1,
            x2,
            coupling=self.coupling,
            has_aux=True,
            memory_saving=memory_saving,
            unroll=unroll,
            exact_every=exact_every if memory_saving else None,
            context=tuple(context),
            arithmetic=self.arithmetic,
            frac_bits=self.frac_bits,
            return_peak=fixed,
            rebuild=self.rebuild,
            rebuild_probe=self.rebuild_mismatches[...] if fixed else None,
        )
        ((y1, y2), (f_new, g_new)), peak = out if fixed else (out, None)
        if fixed:
            record_peak(self.carry_peak, peak)
        # The forward's new state (batch statistics, advanced RNG counters), stacked over units:
        # one update per call, as in plain mode.
        nnx.update(self.f, f_new)
        nnx.update(self.g, g_new)
        return y1, y2
