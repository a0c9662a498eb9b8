"""What `revjax.RevNet` and `revjax.ResNet` share: their options, stem, head and checks.

The stem (CIFAR conv3x3, or ImageNet conv7x7/2 + maxpool) and the head (BN, ReLU, global
average pool, dense) of the official code's layout, described in `revjax.models`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from revjax._blocks import BLOCKS, LayerConfig
from revjax._carry import DEFAULT_FRAC_BITS
from revjax._checks import check_images
from revjax._options import ModelOptions, OptionsModule, resolve_options, settable

Array = jax.Array
Dtype = Any

STEMS = ("cifar", "imagenet")
DOWNSAMPLES = ("pool", "invertible")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetworkOptions(ModelOptions):
    """The options `revjax.RevNet` and `revjax.ResNet` share (their architecture and numerics).

    Sequences are stored as tuples of ints, so options compare and hash by value.

    Attributes:
      units_per_stage: units per stage (the entry unit included), e.g. ``(3, 3, 3)``.
      widths: total channels ``[stem, stage 1, ...]``; bottleneck stage widths are multiplied
        by 4 (the stem's is not), as in the official configs.
      block: ``'basic'`` or ``'bottleneck'``.
      stem: ``'cifar'`` (conv3x3) or ``'imagenet'`` (conv7x7/2 + maxpool).
      num_classes: number of logits.
      in_channels: image channels.
      strides: per-stage stride of the entry unit; ``None``: ``(1, 2, 2, ...)``.
      zero_init_last_bn: zero-initialise the scale of each residual function's last BN (every
        unit starts as the identity); not the paper's default.
      unroll: scan unroll of the units; None: full on CPU, rolled on GPU/TPU. Also settable as
        an attribute.
      dtype: compute dtype (default: ``param_dtype``); inputs are cast to it.
      param_dtype: parameter dtype.
      bn_momentum: BatchNorm running-average decay.
      bn_epsilon: BatchNorm epsilon. 1e-3 (the paper's code) rather than Flax's 1e-5: BatchNorm
        divides the rebuilt activations' rounding error by ``sqrt(var + epsilon)``, which is
        large for near-constant channels (see `revjax.drift` and ``results/bench_drift.md``).
      bn_fast_variance: BatchNorm's one-pass ``E[x^2] - E[x]^2`` variance (Flax's default).
        Off by default: its cancellation loses precision in float32, in plain and reversible
        mode alike (the "fast variance" rows of ``results/bench_drift.md``).
    """

    units_per_stage: Sequence[int]
    widths: Sequence[int]
    block: str = "basic"
    stem: str = "cifar"
    num_classes: int = 10
    in_channels: int = 3
    strides: Sequence[int] | None = None
    zero_init_last_bn: bool = False
    unroll: int | bool | None = settable(None)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    bn_fast_variance: bool = False

    def __post_init__(self):
        for name in ("units_per_stage", "widths", "strides"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | bytes):
                # Tuples: hashable (the options sit in the static GraphDef) and compared by value.
                object.__setattr__(self, name, tuple(int(v) for v in value))


@dataclasses.dataclass(frozen=True)
class RevNetOptions(NetworkOptions):
    """The options of `revjax.RevNet`: the fields of `NetworkOptions` and the following.

    Attributes:
      memory_saving: rebuild activations in the backward (custom VJP); False runs the same
        parameters through plain autodiff. Also settable as an attribute.
      remat_transitions: the entry units and the stem store only their input and recompute
        their activations in the backward (a custom VJP whose recomputation is tied to the
        incoming cotangent, `revjax._stages.call_rematerialised`; on XLA:CPU a
        `jax.checkpoint` saved nothing). Default True: the same gradients for a fraction of the
        memory, for one extra forward of the stem and three units; less is saved where the
        stem has the network's largest activations, as in RevNet-104's ImageNet stem
        (figures: ``results/bench_transitions.md``, ``results/bench_models_h100.md``).
        ``False`` is the paper's code: entry units and stem store their activations. Also
        settable as an attribute.
      downsample: ``'pool'`` (the paper's entry units: average-pool-and-pad or projection
        shortcuts, not invertible) or ``'invertible'`` (i-RevNet, Jacobsen et al. 2018: the
        entry unit's shortcut is space-to-depth plus zero channels, so every unit is
        reversible; the carried halves then grow to ``max(stage width / 2, stride**2 x the
        previous halves)`` channels while F and G keep the stage's width inside). With memory
        saving, all stages then form one `revjax._chain.reversible_chain` (one custom VJP)
        that stores only the last stage's output: every earlier stage's output is rebuilt in
        the backward. ``exact_every`` then counts units across the stages (entry units
        included), so set ``exact_every=None`` to store nothing but the stem's input and the
        head's (RevNet-164: 27 units, ``exact_every=8`` stores the inputs of units 3, 11 and
        19). Needs spatial sizes divisible by every stride (a clear error otherwise).
      exact_every: with memory saving, bound the chain of rebuilt reversible units at k: each
        stage also stores the exact inputs of its reversible units ``n-k, n-2k, ...`` (n =
        ``units - 1``; rebuilding starts from the exact stage output), so rounding error of
        the rebuilt activations accumulates over at most k units, at the cost of
        ``(n - 1) // k`` stored activations per stage: none for stages of up to k + 1 units
        (all the CIFAR presets), memory O(depth / k) beyond. Only useful with
        ``arithmetic="float"``: there, without it, float32 gradients of deep stages lose
        accuracy, because the backward recomputes ReLU masks and BatchNorm statistics
        from rebuilt activations whose error grows towards the stage's first unit
        (`revjax.drift`, ``results/bench_drift.md``); with 8 they match plain float32
        autodiff. ``None`` (default): store none (activation memory flat in depth); the
        default fixed-point arithmetic rebuilds exactly and needs none. Also settable as an
        attribute.
      carry_dtype: dtype of the two halves carried between units (default: the compute
        ``dtype``). With ``dtype=jnp.bfloat16, carry_dtype=jnp.float32`` F and G compute in
        bfloat16 while the halves are added and rebuilt in float32, so mixed-precision training
        keeps a float32 reconstruction; ``jnp.float64`` (with x64 enabled) does the same for a
        float32 model. With fixed-point arithmetic the halves are int32 inside the reversible
        units whatever this is; it is then the dtype F and G receive them in and the stored
        entry-unit inputs' dtype.
      arithmetic: ``"fixed"`` (default) or ``"float"`` (the paper's floating-point rebuild,
        whose drift ``exact_every=8`` bounds). ``"fixed"``: the reversible units carry the
        halves as int32 fixed point with ``frac_bits`` fraction bits, so the backward rebuilds
        their activations bit for bit (no drift at any depth or compute dtype; see
        `revjax.reversible_sequence`). With ``downsample='invertible'`` the whole chain, entry
        units included, is fixed point. Each sequence's largest carry magnitude is kept in a
        `revjax.CarryPeak` (in ``batch_stats``); carries beyond `revjax.carry_limit` make the
        output NaN and `revjax.check_carry_range` names the stage.
      frac_bits: fraction bits of fixed-point carries (grid step ``2**-frac_bits``, range
        ``|value| < 2**(30 - frac_bits)``).
    """

    memory_saving: bool = settable(True)
    remat_transitions: bool = settable(True)
    downsample: str = "pool"
    exact_every: int | None = settable(None)
    carry_dtype: Dtype | None = None
    arithmetic: str = "fixed"
    frac_bits: int = DEFAULT_FRAC_BITS


@dataclasses.dataclass(frozen=True)
class ResNetOptions(NetworkOptions):
    """The options of `revjax.ResNet`: the fields of `NetworkOptions` and the following.

    Attributes:
      remat_units: `jax.checkpoint` every unit (each stores only its input); a baseline for
        the memory benchmark. Also settable as an attribute.
    """

    remat_units: bool = settable(False)


# --------------------------------------------------------------------------------------------
# Stem and head
# --------------------------------------------------------------------------------------------


class Stem(nnx.Module):
    """CIFAR stem (conv3x3 -> BN -> ReLU) or ImageNet stem (conv7x7/2 -> BN -> ReLU -> maxpool).

    Args:
      kind: ``'cifar'`` or ``'imagenet'``.
      in_channels: image channels.
      width: output channels.
      config: shared layer options.
      rngs: initialisation keys.
    """

    def __init__(
        self, kind: str, in_channels: int, width: int, *, config: LayerConfig, rngs: nnx.Rngs
    ):
        self.kind = kind
        if kind == "cifar":
            self.conv = config.conv(in_channels, width, 3, 1, rngs)
        else:
            self.conv = config.conv(in_channels, width, 7, 2, rngs)
        self.bn = config.batch_norm(width, rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Maps images [N, H, W, in] to [N, H', W', width] (H' = H/4 for ImageNet)."""
        h = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
        if self.kind == "imagenet":
            h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
        return h


class Head(nnx.Module):
    """BN -> ReLU -> global average pool -> dense (uniform unit-scaling init, zero bias).

    Args:
      width: input channels.
      num_classes: number of logits.
      config: shared layer options.
      rngs: initialisation keys.
    """

    def __init__(self, width: int, num_classes: int, *, config: LayerConfig, rngs: nnx.Rngs):
        self.bn = config.batch_norm(width, rngs)
        # The official "uniform_scaling" with factor 1: U(-sqrt(3/fan_in), +sqrt(3/fan_in)).
        self.dense = nnx.Linear(
            width,
            num_classes,
            kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "uniform"),
            bias_init=nnx.initializers.zeros,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Maps features [N, H, W, width] to logits [N, num_classes]."""
        h = jax.nn.relu(self.bn(x, use_running_average=not train))
        return self.dense(jnp.mean(h, axis=(1, 2)))  # [N, width] -> [N, classes]


# --------------------------------------------------------------------------------------------
# The shared network
# --------------------------------------------------------------------------------------------


class StagePlan(NamedTuple):
    """One stage of a network, in total channels: its units, input and output width, stride."""

    units: int
    in_channels: int
    out_channels: int
    stride: int


class NetworkPlan(NamedTuple):
    """What `Network.build_network` hands the subclass: the layer options and the stages."""

    config: LayerConfig
    stages: tuple[StagePlan, ...]


class Network(OptionsModule):
    """What RevNet and ResNet share: options, configuration checks, stem, head, input checks."""

    def resolve(
        self,
        units_per_stage: Sequence[int] | None,
        widths: Sequence[int] | None,
        options: NetworkOptions | None,
        overrides: dict[str, Any],
    ) -> Any:
        """The constructor's options (positional arguments and keywords over ``options``),
        kept on the model (`OptionsModule.init_options`)."""
        positional = {"units_per_stage": units_per_stage, "widths": widths}
        overrides = {**{k: v for k, v in positional.items() if v is not None}, **overrides}
        options = resolve_options(type(self).__name__, self.options_class, options, overrides)
        self.init_options(options)
        return options

    def build_network(
        self, options: NetworkOptions, *, halves: bool, rngs: nnx.Rngs
    ) -> NetworkPlan:
        """Checks the options, sets the architecture attributes, builds stem and head."""
        name = type(self).__name__
        units_per_stage, widths, block = options.units_per_stage, options.widths, options.block
        if block not in BLOCKS:
            raise ValueError(f"{name}: unknown block {block!r}; use one of {BLOCKS}.")
        if options.stem not in STEMS:
            raise ValueError(f"{name}: unknown stem {options.stem!r}; use one of {STEMS}.")
        if not units_per_stage or min(units_per_stage) < 1:
            raise ValueError(
                f"{name}: units_per_stage must list at least one stage of >= 1 unit, got "
                f"{units_per_stage}."
            )
        if len(widths) != len(units_per_stage) + 1:
            raise ValueError(
                f"{name}: widths lists the stem width then one width per stage, so it needs "
                f"{len(units_per_stage) + 1} entries for units_per_stage={units_per_stage}; got "
                f"{widths}."
            )
        strides = options.strides
        if strides is None:
            strides = (1,) + (2,) * (len(units_per_stage) - 1)
        if len(strides) != len(units_per_stage):
            raise ValueError(
                f"{name}: strides needs one entry per stage ({len(units_per_stage)}), got "
                f"{strides}."
            )
        mult = 4 if block == "bottleneck" else 1
        stage_widths = [w * mult for w in widths[1:]]
        channels = [widths[0], *stage_widths]
        _check_widths(name, block, channels, stage_widths, halves)

        self.block = block
        self.units_per_stage = units_per_stage
        self.widths = widths
        self.strides = strides
        self.num_classes = options.num_classes
        self.in_channels = options.in_channels
        self.dtype = options.param_dtype if options.dtype is None else options.dtype
        self.param_dtype = options.param_dtype
        config = LayerConfig(
            bn_momentum=options.bn_momentum,
            bn_epsilon=options.bn_epsilon,
            bn_fast_variance=options.bn_fast_variance,
            zero_init_last_bn=options.zero_init_last_bn,
            dtype=self.dtype,
            param_dtype=options.param_dtype,
        )
        self.stem = Stem(options.stem, options.in_channels, widths[0], config=config, rngs=rngs)
        self.head = Head(channels[-1], options.num_classes, config=config, rngs=rngs)
        stages = tuple(map(StagePlan, units_per_stage, channels, stage_widths, strides))
        return NetworkPlan(config, stages)

    def check_input(self, x: Array) -> Array:
        """Validates an image batch and casts it to the compute dtype."""
        check_images(type(self).__name__, x, self.in_channels)
        return x.astype(self.dtype)

    def head_logits(self, h: Array, train: bool) -> Array:
        """The head's logits for features [N, H, W, C]; float32 for half-precision compute."""
        logits = self.head(h, train=train)
        # Half-precision compute still returns float32 logits, for a stable softmax.
        if jnp.finfo(self.dtype).bits < 32:
            logits = logits.astype(jnp.float32)
        return logits


def _check_widths(name, block, channels, stage_widths, halves) -> None:
    """Raises a ValueError for widths the blocks cannot take (odd halves, a bottleneck's
    quarter, a basic shortcut's shrinking)."""
    split = 2 if halves else 1
    for c in channels:
        if c % split:
            raise ValueError(
                f"{name}: every width must be even, since each reversible half gets half "
                f"the channels; got widths {channels} (bottleneck stage widths x4)."
            )
    if block == "bottleneck":
        for c in stage_widths:
            if (c // split) % 4:
                raise ValueError(
                    f"{name}: bottleneck functions narrow to a quarter of their output, so "
                    f"each stage width{' per half' if halves else ''} must be divisible by "
                    f"4; got stage widths {stage_widths}."
                )
    else:
        for c_in, c_out in zip(channels, stage_widths):
            if c_out < c_in:
                raise ValueError(
                    f"{name}: basic shortcuts zero-pad channels, so widths may not shrink "
                    f"from one stage to the next; got {channels}."
                )
