"""Stages of the model zoo: an entry unit followed by stacked units, and the pure calls they use.

* a RevNet stage (`RevStage`) runs its remaining units through one
  `revjax.ReversibleSequence` (the public NNX reversible layer: F and G stacked on a leading
  axis, the NNX scan-over-layers pattern, one `reversible_sequence`); a ResNet stage
  (`ResStage`) runs its remaining units through one ``lax.scan`` over the same kind of stack;
* `InvertibleRevStage` has a reversible entry unit too, and `chain_invertible_stages` joins
  such stages into one `reversible_chain`;
* `call_rematerialised` calls a module storing only its inputs (the stem's and the ResNet's
  recompute); `call_entry_rematerialised` does so for a RevNet entry unit, recomputing one
  branch at a time in the backward.

The units, shortcuts and residual functions are in `revjax._blocks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax import lax

from revjax._blocks import (
    InvertibleEntryUnit,
    LayerConfig,
    ResUnit,
    RevEntryUnit,
    residual_function,
)
from revjax._chain import reversible_chain, sequence_segment, shortcut_unit_segment
from revjax._units import default_unroll, tie_to_cotangent
from revjax.layers import (
    ReversibleSequence,
    new_carry_peak,
    new_rebuild_mismatches,
    pure_call,
    record_peak,
    stacked,
)

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Stacking and pure calls
# --------------------------------------------------------------------------------------------


def call_rematerialised(module: nnx.Module, *args, train: bool) -> Any:
    """Calls ``module`` storing only its inputs: its activations are recomputed in the backward.

    A `jax.custom_vjp` rather than `jax.checkpoint`: on XLA:CPU common-subexpression
    elimination merges a `jax.checkpoint` recomputation back into the forward pass (it saved
    nothing there). Here the recomputation's inputs are tied to the incoming cotangent
    (`revjax._units.tie_to_cotangent`), so it cannot run before the backward reaches this
    module. The forward's new batch statistics are written back once; the recomputation's are
    dropped (it sees the same batch, so it normalises identically).
    """
    graphdef, state = nnx.split(module)
    call = pure_call(graphdef)

    @jax.custom_vjp
    def run(state, args):
        return call(state, *args, train=train)

    def run_fwd(state, args):
        return call(state, *args, train=train), (state, args)

    def run_bwd(residuals, cotangents):
        state, args = residuals
        out_ct, _ = cotangents  # the batch statistics are not differentiated
        args = tie_to_cotangent(args, out_ct)
        _, vjp = jax.vjp(lambda s, a: call(s, *a, train=train)[0], state, args)
        return vjp(out_ct)

    run.defvjp(run_fwd, run_bwd)
    out, new_stats = run(state, tuple(args))
    if train:
        nnx.update(module, new_stats)
    return out


def _entry_shortcuts(entry: nnx.Module) -> tuple[nnx.Module, nnx.Module]:
    """The shortcuts S1, S2 of an entry unit (`InvertibleEntryUnit` uses one for both)."""
    if isinstance(entry, InvertibleEntryUnit):
        return entry.shortcut, entry.shortcut
    return entry.shortcut1, entry.shortcut2


def call_entry_rematerialised(
    entry: RevEntryUnit | InvertibleEntryUnit, x1: Array, x2: Array, *, train: bool
) -> tuple[Array, Array]:
    """Calls a RevNet entry unit (``y1 = S1(x1) + F(x2)``, ``y2 = S2(x2) + G(y1)``) storing
    only its input halves; the backward recomputes its activations one branch at a time.

    `call_rematerialised` would pull back through the whole unit at once, holding F's and G's
    recomputed activations together. Here the backward rebuilds ``y1 = S1(x1) + F(x2)`` (F's
    value only), pulls the cotangent of ``y2`` back through G at ``y1``, then, after an
    optimisation barrier, recomputes F at ``x2`` and pulls back through it, and the shortcuts
    last: as a reversible unit's backward does, so the peak holds one branch's activations.
    The price is one more F forward per entry unit.

    The recomputation waits for the cotangent through the parameters (`tie_to_cotangent` on
    the unit's state), not through the inputs: tying the inputs would make input-sized
    copies, alive next to the stored inputs. Only a parameter-free pooled shortcut, which
    reads ``x1`` alone (pool-and-pad, space-to-depth), gets its input tied, so that it is not
    merged with the forward's.
    Batch statistics are written back once, from the forward pass.
    """
    graphdef, state = nnx.split(entry)
    call = pure_call(graphdef)

    def part(fn: Callable) -> Callable:
        # One piece of the unit as a pure function of the whole unit's state.
        pure = pure_call(graphdef, fn)
        return lambda s, a: pure(s, a)[0]

    # The pieces compute exactly what RevEntryUnit.__call__ does, casts included.
    f_of = part(lambda m, b: m.f(b, train=train))
    g_of = part(lambda m, y1: m.g(y1, train=train))
    s1_of = part(lambda m, a: _entry_shortcuts(m)[0](a).astype(a.dtype))
    s2_of = part(lambda m, b: _entry_shortcuts(m)[1](b).astype(b.dtype))
    pooled = not nnx.state(_entry_shortcuts(entry)[0], nnx.Param)

    @jax.custom_vjp
    def run(state, x1, x2):
        return call(state, x1, x2, train=train)

    def run_fwd(state, x1, x2):
        return call(state, x1, x2, train=train), (state, x1, x2)

    def run_bwd(residuals, cotangents):
        state, x1, x2 = residuals
        (dy1, dy2), _ = cotangents  # the batch statistics are not differentiated
        state = tie_to_cotangent(state, (dy1, dy2))
        if pooled:
            x1 = tie_to_cotangent(x1, (dy1, dy2))
        s1 = s1_of(state, x1)
        y1 = s1 + f_of(state, x2).astype(s1.dtype)
        h_g, g_vjp = jax.vjp(g_of, state, y1)
        ds_g, dy1_from_g = g_vjp(dy2.astype(h_g.dtype))
        dy1 = dy1 + dy1_from_g.astype(dy1.dtype)
        # F's recomputation starts once G's pullback is done (as in `shortcut_unit_segment`).
        x2, dy1 = lax.optimization_barrier((x2, dy1))
        h_f, f_vjp = jax.vjp(f_of, state, x2)
        ds_f, dx2_from_f = f_vjp(dy1.astype(h_f.dtype))
        # The shortcuts' pullbacks last: their input-sized results are then not held through
        # F's pullback.
        x1, dy1, dy2, dx2_from_f = lax.optimization_barrier((x1, dy1, dy2, dx2_from_f))
        ds_1, dx1 = jax.vjp(s1_of, state, x1)[1](dy1)
        ds_2, dx2 = jax.vjp(s2_of, state, x2)[1](dy2)
        dstate = jax.tree.map(lambda *d: d[0] + d[1] + d[2] + d[3], ds_g, ds_f, ds_1, ds_2)
        return dstate, dx1, dx2 + dx2_from_f.astype(dx2.dtype)

    run.defvjp(run_fwd, run_bwd)
    out, new_stats = run(state, x1, x2)
    if train:
        nnx.update(entry, new_stats)
    return out


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def _remaining_units(
    make: Callable, n: int, rngs: nnx.Rngs, arithmetic: str, frac_bits: int
) -> ReversibleSequence | None:
    """A stage's reversible units after its entry unit (F and G both built by ``make``), or
    None for a stage of one unit."""
    if not n:
        return None
    return ReversibleSequence(make, make, n, rngs=rngs, arithmetic=arithmetic, frac_bits=frac_bits)


class RevStage(nnx.Module):
    """A RevNet stage: one entry unit, then ``units - 1`` reversible units.

    The reversible units are a `revjax.ReversibleSequence` (``self.reversible``, ``None`` for a
    one-unit stage) of residual functions F and G: parameters at ``reversible.f`` and
    ``reversible.g``, stacked over units.

    Args:
      block: ``'basic'`` or ``'bottleneck'``.
      units: number of units (entry unit included), at least 1.
      in_features: total input channels.
      out_features: total output channels.
      stride: stride of the entry unit.
      first: whether this is the network's first stage (its entry F skips the BN-ReLU).
      config: shared layer options.
      rngs: initialisation keys.
      arithmetic: carry arithmetic of the reversible units (``"float"`` or ``"fixed"``; see
        `revjax.ReversibleSequence`).
      frac_bits: fraction bits of fixed-point carries.
    """

    def __init__(
        self,
        block: str,
        units: int,
        in_features: int,
        out_features: int,
        *,
        stride: int,
        first: bool,
        config: LayerConfig,
        rngs: nnx.Rngs,
        arithmetic: str = "float",
        frac_bits: int = 16,
    ):
        self.entry = RevEntryUnit(
            block,
            in_features,
            out_features,
            stride=stride,
            preact=not first,
            config=config,
            rngs=rngs,
        )
        half = out_features // 2
        make = lambda r: residual_function(block, half, half, config=config, rngs=r)
        self.num_reversible = units - 1
        self.reversible = _remaining_units(make, self.num_reversible, rngs, arithmetic, frac_bits)

    def __call__(
        self,
        x1: Array,
        x2: Array,
        *,
        train: bool,
        memory_saving: bool = True,
        remat_entry: bool = False,
        unroll: int | bool | None = None,
        exact_every: int | None = None,
    ) -> tuple[Array, Array]:
        """Applies the stage to halves [N, H, W, in/2] -> [N, H/s, W/s, out/2].

        Args:
          x1: first half of the input.
          x2: second half of the input.
          train: batch statistics (and one running-average update) vs running averages.
          memory_saving: rebuild activations in the backward (custom VJP) vs plain autodiff.
          remat_entry: recompute the entry unit's activations in the backward, one branch at
            a time (`call_entry_rematerialised`).
          unroll: scan unroll of the reversible units (None: `default_unroll`).
          exact_every: with memory saving, also store the exact input of every k-th reversible
            unit, bounding accumulated reconstruction error (see `reversible_sequence`).
        """
        if remat_entry:
            y1, y2 = call_entry_rematerialised(self.entry, x1, x2, train=train)
        else:
            y1, y2 = self.entry(x1, x2, train=train)
        if self.reversible is None:
            return y1, y2
        # The settings belong to the RevNet (settable attributes there): passed per call.
        # Batch statistics are written back once, from the forward pass.
        return self.reversible.call_with(
            y1,
            y2,
            (),
            {"train": train},
            memory_saving=memory_saving,
            exact_every=exact_every,
            unroll=unroll,
        )


class InvertibleRevStage(RevStage):
    """A RevNet stage whose entry unit is reversible too (`InvertibleEntryUnit`).

    The carried halves have ``out_features`` channels (at least ``stride**2`` times the
    input's), while F and G keep the inner width ``mid_features``. The RevNet applies its
    invertible stages together through `chain_invertible_stages` (one custom VJP for the whole
    body, storing only the last stage's output); called on its own, with memory saving the
    entry unit stores its input and recomputes its activations in the backward. Call
    arguments as `RevStage` (``remat_entry`` is implied by ``memory_saving``).

    Args:
      block: ``'basic'`` or ``'bottleneck'``.
      units: number of units (entry unit included), at least 1.
      in_features: channels per input half.
      out_features: channels per output half.
      mid_features: inner width of every F and G.
      stride: stride of the entry unit.
      first: whether this is the network's first stage (its entry F skips the BN-ReLU).
      config: shared layer options.
      rngs: initialisation keys.
      arithmetic: carry arithmetic of the reversible units and, in `chain_invertible_stages`,
        of the entry unit (whose `CarryPeak` is ``entry_peak``).
      frac_bits: fraction bits of fixed-point carries.
    """

    def __init__(
        self,
        block: str,
        units: int,
        in_features: int,
        out_features: int,
        *,
        mid_features: int,
        stride: int,
        first: bool,
        config: LayerConfig,
        rngs: nnx.Rngs,
        arithmetic: str = "float",
        frac_bits: int = 16,
    ):
        self.entry = InvertibleEntryUnit(
            block,
            in_features,
            out_features,
            mid_features=mid_features,
            stride=stride,
            preact=not first,
            config=config,
            rngs=rngs,
        )
        make = lambda r: residual_function(
            block, out_features, out_features, mid_features=mid_features, config=config, rngs=r
        )
        self.num_reversible = units - 1
        self.reversible = _remaining_units(make, self.num_reversible, rngs, arithmetic, frac_bits)
        self.arithmetic, self.frac_bits = arithmetic, frac_bits
        fixed = arithmetic == "fixed"
        self.entry_peak = new_carry_peak(frac_bits) if fixed else None
        # The entry unit's rebuild check in `chain_invertible_stages` (see
        # `revjax.RebuildMismatches`); its reversible units have their sequence's.
        self.entry_rebuild_mismatches = new_rebuild_mismatches() if fixed else None

    def __call__(self, x1: Array, x2: Array, *, train: bool, memory_saving: bool = True, **kw):
        """As `RevStage.__call__`; the entry unit is recomputed whenever memory saving is on."""
        kw["remat_entry"] = memory_saving
        return super().__call__(x1, x2, train=train, memory_saving=memory_saving, **kw)


def chain_invertible_stages(
    stages: Sequence[InvertibleRevStage],
    x1: Array,
    x2: Array,
    *,
    train: bool,
    unroll: int | bool | None = None,
    exact_every: int | None = None,
    memory_saving: bool = True,
) -> tuple[Array, Array]:
    """Applies invertible stages as one `revjax._chain.reversible_chain`: one custom VJP that
    stores only the last stage's output (and the inputs ``exact_every`` names, counted over all
    units of all stages), so the whole body of an i-RevNet stores one pair of halves.

    Each stage contributes its entry unit (a `shortcut_unit_segment` over the space-to-depth
    shortcut) and its reversible units (a `sequence_segment`). Batch statistics are written
    back once, from the forward pass. The carry arithmetic is the stages' (``"fixed"``: the
    whole chain on int32 carries, rebuilt bit for bit); each segment's largest carry
    magnitude goes to its `CarryPeak` (the stage's ``entry_peak``, its sequence's
    ``carry_peak``). Fixed point also checks the rebuild: the gradient of each segment's
    `revjax.RebuildMismatches` (the stage's ``entry_rebuild_mismatches``, its sequence's
    ``rebuild_mismatches``) is the number of its units rebuilt differently from the forward.
    """
    segments, params, modules, peaks, probes = [], [], [], [], []
    arithmetic, frac_bits = stages[0].arithmetic, stages[0].frac_bits
    fixed = arithmetic == "fixed"

    def branches(f: nnx.Module, g: nnx.Module) -> tuple[Callable, Callable]:
        # F and G as the core's pure ``(state, x) -> (h, new_state)``; their states as params.
        (f_def, f_state), (g_def, g_state) = nnx.split(f), nnx.split(g)
        params.append((f_state, g_state))
        modules.append((f, g))
        calls = [pure_call(d) for d in (f_def, g_def)]
        return tuple(lambda p, x, c=c: c(p, x, train=train) for c in calls)

    for stage in stages:
        entry = stage.entry
        f, g = branches(entry.f, entry.g)
        segments.append(
            shortcut_unit_segment(f, g, entry.shortcut, entry.shortcut.inverse, has_aux=True)
        )
        peaks.append(stage.entry_peak)
        probes.append(stage.entry_rebuild_mismatches)
        if stage.reversible is not None:
            rev = stage.reversible
            f, g = branches(rev.f, rev.g)
            segments.append(sequence_segment(f, g, rev.num_units, has_aux=True, unroll=unroll))
            peaks.append(rev.carry_peak)
            probes.append(rev.rebuild_mismatches)
    out = reversible_chain(
        segments,
        params,
        x1,
        x2,
        exact_every=exact_every if memory_saving else None,
        memory_saving=memory_saving,
        arithmetic=arithmetic,
        frac_bits=frac_bits,
        return_peak=fixed,
        # Each segment's `RebuildMismatches` value: its gradient counts the segment's units
        # whose rebuild differed from the forward.
        rebuild_probes=[p[...] for p in probes] if fixed else None,
    )
    ((y1, y2), aux), seg_peaks = out if fixed else (out, None)
    for (f_mod, g_mod), (f_new, g_new) in zip(modules, aux, strict=True):
        nnx.update(f_mod, f_new)
        nnx.update(g_mod, g_new)
    if fixed:
        for variable, peak in zip(peaks, seg_peaks, strict=True):
            record_peak(variable, peak)
    return y1, y2


class ResStage(nnx.Module):
    """A ResNet stage: one entry unit, then ``units - 1`` ordinary units with stacked weights.

    Args as `RevStage`; widths are the unit's full channel counts.
    """

    def __init__(
        self,
        block: str,
        units: int,
        in_features: int,
        out_features: int,
        *,
        stride: int,
        first: bool,
        config: LayerConfig,
        rngs: nnx.Rngs,
    ):
        self.entry = ResUnit(
            block,
            in_features,
            out_features,
            stride=stride,
            preact=not first,
            config=config,
            rngs=rngs,
        )
        make = lambda r: ResUnit(block, out_features, out_features, config=config, rngs=r)
        self.num_stacked = units - 1
        self.units = stacked(self.num_stacked, make, rngs) if self.num_stacked else None

    def __call__(
        self,
        x: Array,
        *,
        train: bool,
        remat_units: bool = False,
        unroll: int | bool | None = None,
    ) -> Array:
        """Applies the stage: x [N, H, W, in] -> [N, H/s, W/s, out].

        Args:
          x: input activations.
          train: batch statistics (and one running-average update) vs running averages.
          remat_units: `jax.checkpoint` every unit (each stores only its input).
          unroll: scan unroll of the stacked units (None: `default_unroll`).
        """
        if remat_units:
            h = call_rematerialised(self.entry, x, train=train)
        else:
            h = self.entry(x, train=train)
        if not self.num_stacked:
            return h
        graphdef, state = nnx.split(self.units)
        call = pure_call(graphdef)

        def body(carry, unit_state):
            return call(unit_state, carry, train=train)

        if remat_units:
            body = jax.checkpoint(body)
        if unroll is None:
            unroll = default_unroll(self.num_stacked)
        h, new_stats = lax.scan(body, h, state, unroll=unroll)
        if train:
            nnx.update(self.units, new_stats)
        return h
