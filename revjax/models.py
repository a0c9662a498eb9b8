"""The model zoo: `RevNet` and its `ResNet` twin as Flax NNX modules, with the paper's presets.

Architecture of the official code (renmengye/revnet-public), see `revjax._blocks`::

    stem   CIFAR:    conv3x3 (stride 1) -> BN -> ReLU
           ImageNet: conv7x7 (stride 2) -> BN -> ReLU -> maxpool 3x3 / 2
    stage  entry unit (may stride / widen; stores its input)
           + (units - 1) units: reversible (RevNet, one `reversible_sequence`) or ordinary
    head   BN -> ReLU -> global average pool -> dense

Widths are total channels (each RevNet half gets half); bottleneck models multiply the stage
widths (not the stem's) by 4.

Parameter counts, derived from these rules (``k*k*in*out`` per conv, ``2*c`` per BN, the dense
layer ``C*classes + classes``) and checked in ``tests/test_models.py``; e.g. ``revnet38`` on
CIFAR-10:

* stem: 3*3*3*32 + 2*32 = 928;
* stage 1 (halves 16): the entry unit's F skips its leading BN (the stem just activated the
  input): 9*16*16 + 32 + 9*16*16 = 4640; its G and the other 2 units' F and G are full basic
  functions, 32 + 4640 = 4672 each: 4640 + 5 * 4672 = 28,000;
* stage 2 (halves 16 -> 32, shortcuts pool-and-pad, no parameters): entry F 32 + 9*16*32 + 64 +
  9*32*32 = 14,432, then 5 full functions of 32 -> 32 at 64 + 2*9216 + 64 = 18,560: 107,232;
* stage 3 (halves 32 -> 56): entry F 64 + 9*32*56 + 112 + 9*56*56 = 44,528, then 5 functions of
  56 -> 56 at 112 + 2*28,224 + 112 = 56,672: 327,888;
* head: BN 2*112 = 224, dense 112*10 + 10 = 1130;
* total 928 + 28,000 + 107,232 + 327,888 + 224 + 1130 = 464,890 (the table's figure).

Bottleneck RevNets add, in each entry unit whose stride or width changes (every stage's, the
first included since the stem is narrower than the stage), one 1x1 projection conv per half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from revjax._blocks import BLOCKS, LayerConfig
from revjax._carry import DEFAULT_FRAC_BITS, check_arithmetic
from revjax._checks import check_images
from revjax._coupling import merge_halves, split_halves
from revjax._sequence import check_exact_every
from revjax._stages import (
    InvertibleRevStage,
    ResStage,
    RevStage,
    call_rematerialised,
    chain_invertible_stages,
)
from revjax.layers import pure_call
from revjax.presets import register

Array = jax.Array
Dtype = Any

STEMS = ("cifar", "imagenet")
DOWNSAMPLES = ("pool", "invertible")

__all__ = [
    "ResNet",
    "RevNet",
    "apply",
    "count_params",
    "functional",
    "resnet32",
    "resnet50",
    "resnet101",
    "resnet110",
    "resnet164",
    "resnet_tiny",
    "revnet38",
    "revnet56",
    "revnet104",
    "revnet110",
    "revnet164",
    "revnet_tiny",
]


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
# Networks
# --------------------------------------------------------------------------------------------


def _default_strides(num_stages: int) -> tuple[int, ...]:
    return (1,) + (2,) * (num_stages - 1)


class _Network(nnx.Module):
    """What RevNet and ResNet share: configuration checks, stem, head and input checks."""

    def _setup(
        self,
        units_per_stage: Sequence[int],
        widths: Sequence[int],
        *,
        block: str,
        stem: str,
        num_classes: int,
        in_channels: int,
        strides: Sequence[int] | None,
        unroll: int | bool | None,
        dtype: Dtype | None,
        param_dtype: Dtype,
        bn_momentum: float,
        bn_epsilon: float,
        bn_fast_variance: bool,
        zero_init_last_bn: bool,
        halves: bool,
        rngs: nnx.Rngs,
    ) -> tuple[LayerConfig, list[tuple[int, int, int, int]]]:
        """Checks the configuration, builds stem and head; returns per-stage (units, in, out, s)."""
        name = type(self).__name__
        units_per_stage = tuple(int(u) for u in units_per_stage)
        widths = tuple(int(w) for w in widths)
        if block not in BLOCKS:
            raise ValueError(f"{name}: unknown block {block!r}; use one of {BLOCKS}.")
        if stem not in STEMS:
            raise ValueError(f"{name}: unknown stem {stem!r}; use one of {STEMS}.")
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
        strides = _default_strides(len(units_per_stage)) if strides is None else tuple(strides)
        if len(strides) != len(units_per_stage):
            raise ValueError(
                f"{name}: strides needs one entry per stage ({len(units_per_stage)}), got "
                f"{strides}."
            )
        mult = 4 if block == "bottleneck" else 1
        stage_widths = [w * mult for w in widths[1:]]
        channels = [widths[0], *stage_widths]
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

        self.block = block
        self.units_per_stage = units_per_stage
        self.widths = widths
        self.strides = strides
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.unroll = unroll
        self.dtype = param_dtype if dtype is None else dtype
        self.param_dtype = param_dtype
        config = LayerConfig(
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
            bn_fast_variance=bn_fast_variance,
            zero_init_last_bn=zero_init_last_bn,
            dtype=self.dtype,
            param_dtype=param_dtype,
        )
        self.stem = Stem(stem, in_channels, widths[0], config=config, rngs=rngs)
        self.head = Head(channels[-1], num_classes, config=config, rngs=rngs)
        plan = [
            (units, c_in, c_out, stride)
            for units, c_in, c_out, stride in zip(units_per_stage, channels, stage_widths, strides)
        ]
        return config, plan

    def _check_input(self, x: Array) -> Array:
        """Validates an image batch and casts it to the compute dtype."""
        check_images(type(self).__name__, x, self.in_channels)
        return x.astype(self.dtype)

    def _logits(self, h: Array, train: bool) -> Array:
        logits = self.head(h, train=train)
        # Half-precision compute still returns float32 logits, for a stable softmax.
        if jnp.finfo(self.dtype).bits < 32:
            logits = logits.astype(jnp.float32)
        return logits


class RevNet(_Network):
    """Reversible residual network (Gomez et al., 2017) on NHWC images.

    Each stage: one entry unit (stride / width change; stores its input and, by default,
    recomputes its activations in the backward), then ``units - 1`` reversible units through
    one `reversible_sequence` whose backward rebuilds their activations instead of storing
    them.

    Args:
      units_per_stage: units per stage (the entry unit included), e.g. ``(3, 3, 3)``.
      widths: total channels ``[stem, stage 1, ...]``; bottleneck stage widths are multiplied
        by 4 (the stem's is not), as in the official configs.
      block: ``'basic'`` or ``'bottleneck'``.
      stem: ``'cifar'`` (conv3x3) or ``'imagenet'`` (conv7x7/2 + maxpool).
      num_classes: number of logits.
      in_channels: image channels.
      strides: per-stage stride of the entry unit; default ``(1, 2, 2, ...)``.
      memory_saving: rebuild activations in the backward (custom VJP); False runs the same
        parameters through plain autodiff. Also settable as an attribute.
      remat_transitions: the entry units and the stem store only their input and recompute
        their activations in the backward (a custom VJP whose recomputation is tied to the
        incoming cotangent, `revjax._stages.call_rematerialised`; on XLA:CPU a
        `jax.checkpoint` saved nothing). Default True: the same gradients for a fraction of the
        memory (RevNet-164: about half; RevNet-104, whose ImageNet stem has the network's
        largest activations: 14 % less at batch 32), for one extra forward of the stem and
        three units (``results/bench_transitions.md``). ``False`` is the paper's code: entry
        units and stem store their activations. Also settable as an attribute.
      downsample: ``'pool'`` (the paper's entry units: average-pool-and-pad or projection
        shortcuts, not invertible) or ``'invertible'`` (i-RevNet, Jacobsen et al. 2018: the
        entry unit's shortcut is space-to-depth plus zero channels, so every unit is
        reversible; the carried halves then grow to ``max(stage width / 2, stride**2 x the
        previous halves)`` channels while F and G keep the stage's width inside). With memory
        saving, all stages then form one `revjax._core.reversible_chain` (one custom VJP)
        that stores only the last stage's output: every earlier stage's output is rebuilt in
        the backward. ``exact_every`` then counts units across the stages (entry units
        included), so set ``exact_every=None`` to store nothing but the stem's input and the
        head's (RevNet-164: 27 units, ``exact_every=8`` stores the inputs of units 3, 11 and
        19). Needs spatial sizes divisible by every stride (a clear error otherwise).
      zero_init_last_bn: zero-initialise the scale of each residual function's last BN (every
        unit starts as the identity); not the paper's default.
      unroll: scan unroll of reversible units; None: full on CPU, rolled on GPU/TPU.
      dtype: compute dtype (default: ``param_dtype``); inputs are cast to it.
      param_dtype: parameter dtype.
      bn_momentum: BatchNorm running-average decay.
      bn_epsilon: BatchNorm epsilon. 1e-3 (the paper's code) rather than Flax's 1e-5: BatchNorm
        divides the rebuilt activations' rounding error by ``sqrt(var + epsilon)``, which is
        large for near-constant channels (see `revjax.drift` and ``results/bench_drift.md``).
      bn_fast_variance: BatchNorm's one-pass ``E[x^2] - E[x]^2`` variance (Flax's default).
        Off by default: it loses ~1e-4 relative in float32, in plain and reversible mode alike.
      exact_every: with memory saving, bound the chain of rebuilt reversible units at k: each
        stage also stores the exact inputs of its reversible units ``n-k, n-2k, ...`` (n =
        ``units - 1``; rebuilding starts from the exact stage output), so rounding error of
        the rebuilt activations accumulates over at most k units, at the cost of
        ``(n - 1) // k`` stored activations per stage: none for stages of up to k + 1 units
        (all the CIFAR presets), memory O(depth / k) beyond. Only useful with
        ``arithmetic="float"``: there, without it, float32 gradients of deep stages lose up to
        ~1e-2 relative, because the backward recomputes ReLU masks and BatchNorm statistics
        from rebuilt activations whose error grows towards the stage's first unit
        (`revjax.drift`, ``results/bench_drift.md``); with 8 they match plain float32
        autodiff. ``None`` (default): store none (activation memory flat in depth); the
        default fixed-point arithmetic rebuilds exactly and needs none. Also settable as an
        attribute.
      carry_dtype: dtype of the two halves carried between units (default: the compute
        ``dtype``). With ``dtype=jnp.bfloat16, carry_dtype=jnp.float32`` F and G compute in
        bfloat16 but the halves are added and rebuilt in float32, so mixed-precision training
        keeps a float32 reconstruction; ``jnp.float64`` (with x64 enabled) does the same for a
        float32 model. With fixed-point arithmetic the halves are int32 inside the reversible
        units whatever this is; it is then the dtype F and G receive them in and the stored
        entry-unit inputs' dtype.
      arithmetic: ``"fixed"`` (default) or ``"float"`` (the paper's floating-point rebuild,
        whose drift ``exact_every=8`` bounds). ``"fixed"``: the reversible units carry the
        halves as int32 fixed point with ``frac_bits`` fraction
        bits, so the backward rebuilds their activations bit for bit (no drift at any depth or
        compute dtype; see `revjax.reversible_sequence`). With ``downsample='invertible'`` the
        whole chain, entry units included, is fixed point. Each sequence's largest carry
        magnitude is kept in a `revjax.CarryPeak` (in ``batch_stats``); carries beyond
        `revjax.carry_limit` make the output NaN and `revjax.check_carry_range` names the stage.
      frac_bits: fraction bits of fixed-point carries (grid step ``2**-frac_bits``, range
        ``|value| < 2**(30 - frac_bits)``).
      rngs: initialisation keys (``params`` stream).
    """

    def __init__(
        self,
        units_per_stage: Sequence[int],
        widths: Sequence[int],
        *,
        block: str = "basic",
        stem: str = "cifar",
        num_classes: int = 10,
        in_channels: int = 3,
        strides: Sequence[int] | None = None,
        memory_saving: bool = True,
        remat_transitions: bool = True,
        downsample: str = "pool",
        zero_init_last_bn: bool = False,
        unroll: int | bool | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        bn_fast_variance: bool = False,
        exact_every: int | None = None,
        carry_dtype: Dtype | None = None,
        arithmetic: str = "fixed",
        frac_bits: int = DEFAULT_FRAC_BITS,
        rngs: nnx.Rngs,
    ):
        check_arithmetic(arithmetic, frac_bits, owner="RevNet")
        arith = {"arithmetic": arithmetic, "frac_bits": frac_bits}
        config, plan = self._setup(
            units_per_stage,
            widths,
            block=block,
            stem=stem,
            num_classes=num_classes,
            in_channels=in_channels,
            strides=strides,
            unroll=unroll,
            dtype=dtype,
            param_dtype=param_dtype,
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
            bn_fast_variance=bn_fast_variance,
            zero_init_last_bn=zero_init_last_bn,
            halves=True,
            rngs=rngs,
        )
        check_exact_every(exact_every, "RevNet")
        self.exact_every = exact_every
        self.arithmetic = arithmetic
        self.frac_bits = frac_bits
        self.carry_dtype = self.dtype if carry_dtype is None else jnp.dtype(carry_dtype)
        self.memory_saving = memory_saving
        self.remat_transitions = remat_transitions
        if downsample not in DOWNSAMPLES:
            raise ValueError(
                f"RevNet: unknown downsample {downsample!r}; use one of {DOWNSAMPLES}."
            )
        self.downsample = downsample
        if downsample == "invertible":
            self.stages = nnx.List(_invertible_stages(block, plan, config, rngs, **arith))
            # The head sees the grown halves.
            carried = 2 * self.stages[-1].entry.shortcut.out_features
            self.head = Head(carried, num_classes, config=config, rngs=rngs)
        else:
            self.stages = nnx.List(
                [
                    RevStage(
                        block,
                        units,
                        c_in,
                        c_out,
                        stride=stride,
                        first=i == 0,
                        config=config,
                        rngs=rngs,
                        **arith,
                    )
                    for i, (units, c_in, c_out, stride) in enumerate(plan)
                ]
            )

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Computes logits.

        Args:
          x: images [N, H, W, in_channels], floating point.
          train: True: BatchNorm uses batch statistics and updates its running averages once;
            False: it uses the running averages and nothing changes.

        Returns:
          logits [N, num_classes] (float32 for half-precision compute).

        Raises:
          ValueError: for a rank other than 4, a wrong channel count or an integer dtype.
        """
        h1, h2 = self.stem_halves(x, train=train)
        if self.downsample == "invertible" and (self.memory_saving or self.arithmetic == "fixed"):
            # Every unit is invertible: one custom VJP over all stages stores only the last
            # stage's output, rebuilding every earlier stage's output in the backward. Without
            # memory saving, fixed point runs the same chain (entry units rounded too) through
            # plain autodiff.
            h1, h2 = chain_invertible_stages(
                self.stages,
                h1,
                h2,
                train=train,
                unroll=self.unroll,
                exact_every=self.exact_every,
                memory_saving=self.memory_saving,
            )
            return self._logits(merge_halves(h1, h2).astype(self.dtype), train)
        for stage in self.stages:
            h1, h2 = stage(
                h1,
                h2,
                train=train,
                memory_saving=self.memory_saving,
                remat_entry=self.remat_transitions,
                unroll=self.unroll,
                exact_every=self.exact_every,
            )
        return self._logits(merge_halves(h1, h2).astype(self.dtype), train)

    def stem_halves(self, x: Array, *, train: bool) -> tuple[Array, Array]:
        """The stem's output split into the halves the first stage takes, in the carry dtype.

        Maps images [N, H, W, in] to two halves [N, H', W', C/2]; also used by `revjax.drift`.
        """
        x = self._check_input(x)
        if self.memory_saving and (self.remat_transitions or self.downsample == "invertible"):
            # Like the entry units: store the images only, recompute the stem's activations
            # in the backward (the ImageNet stem's are the network's largest).
            h = call_rematerialised(self.stem, x, train=train)
        else:
            h = self.stem(x, train=train)
        h1, h2 = split_halves(h)  # [N, H', W', C/2] each
        return h1.astype(self.carry_dtype), h2.astype(self.carry_dtype)


def _invertible_stages(block, plan, config, rngs, **arith) -> list[InvertibleRevStage]:
    """The stages of an invertible-downsampling RevNet, from the pool plan (total widths).

    Halves: each stage carries ``max(width / 2, stride**2 x previous)`` channels, so its entry
    unit's space-to-depth plus zero padding is injective; F and G keep the stage's own width
    inside (a basic function's first conv, a bottleneck's quarter width).
    """
    stages = []
    carried = plan[0][1] // 2  # the stem's half
    for i, (units, _, c_out, stride) in enumerate(plan):
        half = c_out // 2
        out = max(half, stride * stride * carried)
        mid = half // 4 if block == "bottleneck" else half
        stages.append(
            InvertibleRevStage(
                block,
                units,
                carried,
                out,
                mid_features=mid,
                stride=stride,
                first=i == 0,
                config=config,
                rngs=rngs,
                **arith,
            )
        )
        carried = out
    return stages


class ResNet(_Network):
    """Pre-activation ResNet, the RevNet's twin: same blocks, ordinary residual units.

    Takes the arguments of `RevNet` except ``memory_saving``, ``remat_transitions``,
    ``exact_every`` and ``carry_dtype``, and one more:

    Args:
      remat_units: `jax.checkpoint` every unit (each stores only its input); a baseline for
        the memory benchmark. Also settable as an attribute.
    """

    def __init__(
        self,
        units_per_stage: Sequence[int],
        widths: Sequence[int],
        *,
        block: str = "basic",
        stem: str = "cifar",
        num_classes: int = 10,
        in_channels: int = 3,
        strides: Sequence[int] | None = None,
        remat_units: bool = False,
        zero_init_last_bn: bool = False,
        unroll: int | bool | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        bn_fast_variance: bool = False,
        rngs: nnx.Rngs,
    ):
        config, plan = self._setup(
            units_per_stage,
            widths,
            block=block,
            stem=stem,
            num_classes=num_classes,
            in_channels=in_channels,
            strides=strides,
            unroll=unroll,
            dtype=dtype,
            param_dtype=param_dtype,
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
            bn_fast_variance=bn_fast_variance,
            zero_init_last_bn=zero_init_last_bn,
            halves=False,
            rngs=rngs,
        )
        self.remat_units = remat_units
        self.stages = nnx.List(
            [
                ResStage(
                    block, units, c_in, c_out, stride=stride, first=i == 0, config=config, rngs=rngs
                )
                for i, (units, c_in, c_out, stride) in enumerate(plan)
            ]
        )

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Computes logits; arguments, return value and errors as `RevNet.__call__`."""
        h = self.stem(self._check_input(x), train=train)
        for stage in self.stages:
            h = stage(h, train=train, remat_units=self.remat_units, unroll=self.unroll)
        return self._logits(h, train)


# --------------------------------------------------------------------------------------------
# Pure functional path (for jit-compiled training steps)
# --------------------------------------------------------------------------------------------


def functional(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Splits a model once into ``(graphdef, params, batch_stats)`` for pure training steps.

    ``graphdef`` is static (hashable; pass it by closure or as a static argument) and holds the
    configuration, including ``memory_saving`` and the remat flags; ``params`` (trainable) and
    ``batch_stats`` (BatchNorm running averages, and any other non-trainable variable, such as
    the ViTs' block indices) are pytrees of arrays.
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    return graphdef, params, batch_stats


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_stats: nnx.State,
    x: Array,
    *,
    train: bool,
) -> tuple[Array, nnx.State]:
    """Runs a model split by `functional` as a pure function (usable inside `jax.jit`).

    Args:
      graphdef: from `functional`.
      params: trainable parameters (differentiate with respect to these).
      batch_stats: BatchNorm running averages.
      x: images [N, H, W, C].
      train: batch statistics and updated running averages (True) or running averages.

    Returns:
      ``(logits, new_batch_stats)``; in eval mode ``new_batch_stats`` equals ``batch_stats``.
    """
    return pure_call(graphdef)((params, batch_stats), x, train=train)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (works on abstract models from `nnx.eval_shape`)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


_CIFAR_BASIC = dict(block="basic", stem="cifar")
_CIFAR_BOTTLENECK = dict(block="bottleneck", stem="cifar")
_IMAGENET = dict(block="bottleneck", stem="imagenet")

resnet32 = register(
    "resnet32",
    ResNet,
    "ResNet-32 (CIFAR): 464,154 parameters for 10 classes.",
    units_per_stage=(5, 5, 5),
    widths=(16, 16, 32, 64),
    **_CIFAR_BASIC,
)
revnet38 = register(
    "revnet38",
    RevNet,
    "RevNet-38 (CIFAR): 464,890 parameters for 10 classes.",
    twin="resnet32",
    units_per_stage=(3, 3, 3),
    widths=(32, 32, 64, 112),
    **_CIFAR_BASIC,
)
resnet110 = register(
    "resnet110",
    ResNet,
    "ResNet-110 (CIFAR): 1,727,962 parameters for 10 classes.",
    units_per_stage=(18, 18, 18),
    widths=(16, 16, 32, 64),
    **_CIFAR_BASIC,
)
revnet110 = register(
    "revnet110",
    RevNet,
    "RevNet-110 (CIFAR): 1,729,194 parameters for 10 classes.",
    twin="resnet110",
    units_per_stage=(9, 9, 9),
    widths=(32, 32, 64, 128),
    **_CIFAR_BASIC,
)
resnet164 = register(
    "resnet164",
    ResNet,
    "ResNet-164 (CIFAR, bottleneck): 1,703,258 parameters for 10 classes.",
    units_per_stage=(18, 18, 18),
    widths=(16, 16, 32, 64),
    **_CIFAR_BOTTLENECK,
)
revnet164 = register(
    "revnet164",
    RevNet,
    "RevNet-164 (CIFAR, bottleneck): 1,748,778 parameters for 10 classes.",
    twin="resnet164",
    units_per_stage=(9, 9, 9),
    widths=(32, 32, 64, 128),
    **_CIFAR_BOTTLENECK,
)
resnet50 = register(
    "resnet50",
    ResNet,
    "Pre-activation ResNet-50 (ImageNet).",
    units_per_stage=(3, 4, 6, 3),
    widths=(64, 64, 128, 256, 512),
    **_IMAGENET,
)
revnet56 = register(
    "revnet56",
    RevNet,
    "RevNet-56 (ImageNet), the RevNet-104 widths with 2-2-3-2 units.",
    twin="resnet50",
    units_per_stage=(2, 2, 3, 2),
    widths=(128, 128, 256, 512, 832),
    **_IMAGENET,
)
resnet101 = register(
    "resnet101",
    ResNet,
    "Pre-activation ResNet-101 (ImageNet): 44,541,480 parameters.",
    units_per_stage=(3, 4, 23, 3),
    widths=(64, 64, 128, 256, 512),
    **_IMAGENET,
)
revnet104 = register(
    "revnet104",
    RevNet,
    "RevNet-104 (ImageNet): 45,428,072 parameters.",
    twin="resnet101",
    units_per_stage=(2, 2, 11, 2),
    widths=(128, 128, 256, 512, 832),
    **_IMAGENET,
)
revnet_tiny = register(
    "revnet_tiny",
    RevNet,
    "A tiny RevNet for tests (two stages of two units, widths 8/8/16).",
    twin="resnet_tiny",
    units_per_stage=(2, 2),
    widths=(8, 8, 16),
    **_CIFAR_BASIC,
)
resnet_tiny = register(
    "resnet_tiny",
    ResNet,
    "The tiny RevNet's ResNet twin, for tests.",
    units_per_stage=(2, 2),
    widths=(8, 8, 16),
    **_CIFAR_BASIC,
)
