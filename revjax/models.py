"""The model zoo: `RevNet` and its `ResNet` twin as Flax NNX modules, with the paper's presets.

Architecture of the official code (renmengye/revnet-public), see `revjax._blocks`::

    stem   CIFAR:    conv3x3 (stride 1) -> BN -> ReLU
           ImageNet: conv7x7 (stride 2) -> BN -> ReLU -> maxpool 3x3 / 2
    stage  entry unit (may stride / widen; stores its input)
           + (units - 1) units: reversible (RevNet, one `reversible_sequence`) or ordinary
    head   BN -> ReLU -> global average pool -> dense

Widths are total channels (each RevNet half gets half); bottleneck models multiply the stage
widths (not the stem's) by 4. The options of both models are the fields of `RevNetOptions` and
`ResNetOptions` (``revjax._network``, with the stem and head they share).

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

from revjax._blocks import LayerConfig
from revjax._carry import check_arithmetic
from revjax._coupling import merge_halves, split_halves
from revjax._network import DOWNSAMPLES, Head, Network, StagePlan
from revjax._network import NetworkOptions as NetworkOptions
from revjax._network import ResNetOptions as ResNetOptions
from revjax._network import RevNetOptions as RevNetOptions
from revjax._options import constructor_signature
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

__all__ = [
    "NetworkOptions",
    "ResNet",
    "ResNetOptions",
    "RevNet",
    "RevNetOptions",
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


class RevNet(Network):
    """Reversible residual network (Gomez et al., 2017) on NHWC images.

    Each stage: one entry unit (stride / width change; stores its input and, by default,
    recomputes its activations in the backward), then ``units - 1`` reversible units through
    one `reversible_sequence` whose backward rebuilds their activations instead of storing
    them.

    Its options are the fields of `RevNetOptions` (``memory_saving``, ``arithmetic``,
    ``downsample``, ``exact_every``, dtypes, BatchNorm settings...), taken as keywords or as
    one ``options`` object; ``model.options`` gives them back. ``memory_saving``,
    ``remat_transitions``, ``exact_every`` and ``unroll`` are also attributes that may be set
    after construction (``model.memory_saving = False``).

    Args:
      units_per_stage: units per stage (the entry unit included), e.g. ``(3, 3, 3)``.
      widths: total channels ``[stem, stage 1, ...]`` (bottleneck stage widths x4).
      rngs: initialisation keys (``params`` stream).
      options: a `RevNetOptions` (default: its defaults); the other arguments replace its
        fields, so ``units_per_stage`` and ``widths`` may come from it.
      **overrides: any other field of `RevNetOptions`, e.g. ``memory_saving=False``.

    Raises:
      TypeError: a keyword that is not a field of `RevNetOptions` (the message names the
        closest one).
      ValueError: options the network cannot take (unknown block, odd widths...).
    """

    options_class = RevNetOptions

    def __init__(
        self,
        units_per_stage: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        *,
        rngs: nnx.Rngs,
        options: RevNetOptions | None = None,
        **overrides: Any,
    ):
        opts = self.resolve(units_per_stage, widths, options, overrides)
        check_arithmetic(opts.arithmetic, opts.frac_bits, owner="RevNet")
        config, plan = self.build_network(opts, halves=True, rngs=rngs)
        check_exact_every(opts.exact_every, "RevNet")
        self.arithmetic = opts.arithmetic
        self.frac_bits = opts.frac_bits
        self.carry_dtype = self.dtype if opts.carry_dtype is None else jnp.dtype(opts.carry_dtype)
        if opts.downsample not in DOWNSAMPLES:
            raise ValueError(
                f"RevNet: unknown downsample {opts.downsample!r}; use one of {DOWNSAMPLES}."
            )
        self.downsample = opts.downsample
        arith = {"arithmetic": opts.arithmetic, "frac_bits": opts.frac_bits}
        if opts.downsample == "invertible":
            self.stages = nnx.List(invertible_stages(opts.block, plan, config, rngs, **arith))
            # The head sees the grown halves.
            carried = 2 * self.stages[-1].entry.shortcut.out_features
            self.head = Head(carried, opts.num_classes, config=config, rngs=rngs)
        else:
            self.stages = nnx.List(
                [
                    RevStage(
                        opts.block,
                        stage.units,
                        stage.in_channels,
                        stage.out_channels,
                        stride=stage.stride,
                        first=i == 0,
                        config=config,
                        rngs=rngs,
                        **arith,
                    )
                    for i, stage in enumerate(plan)
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
            return self.head_logits(merge_halves(h1, h2).astype(self.dtype), train)
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
        return self.head_logits(merge_halves(h1, h2).astype(self.dtype), train)

    def stem_halves(self, x: Array, *, train: bool) -> tuple[Array, Array]:
        """The stem's output split into the halves the first stage takes, in the carry dtype.

        Maps images [N, H, W, in] to two halves [N, H', W', C/2]; also used by `revjax.drift`.
        """
        x = self.check_input(x)
        if self.memory_saving and (self.remat_transitions or self.downsample == "invertible"):
            # Like the entry units: store the images only, recompute the stem's activations
            # in the backward (the ImageNet stem's are the network's largest).
            h = call_rematerialised(self.stem, x, train=train)
        else:
            h = self.stem(x, train=train)
        h1, h2 = split_halves(h)  # [N, H', W', C/2] each
        return h1.astype(self.carry_dtype), h2.astype(self.carry_dtype)


def invertible_stages(
    block: str, plan: Sequence[StagePlan], config: LayerConfig, rngs: nnx.Rngs, **arith: Any
) -> list[InvertibleRevStage]:
    """The stages of an invertible-downsampling RevNet, from the pool plan (total widths).

    Halves: each stage carries ``max(width / 2, stride**2 x previous)`` channels, so its entry
    unit's space-to-depth plus zero padding is injective; F and G keep the stage's own width
    inside (a basic function's first conv, a bottleneck's quarter width).
    """
    stages = []
    carried = plan[0].in_channels // 2  # the stem's half
    for i, stage in enumerate(plan):
        half = stage.out_channels // 2
        out = max(half, stage.stride * stage.stride * carried)
        mid = half // 4 if block == "bottleneck" else half
        stages.append(
            InvertibleRevStage(
                block,
                stage.units,
                carried,
                out,
                mid_features=mid,
                stride=stage.stride,
                first=i == 0,
                config=config,
                rngs=rngs,
                **arith,
            )
        )
        carried = out
    return stages


class ResNet(Network):
    """Pre-activation ResNet, the RevNet's twin: same blocks, ordinary residual units.

    Its options are the fields of `ResNetOptions`: those of `NetworkOptions` (the RevNet's
    architecture and numerics, without the reversible options) and ``remat_units``; the
    arguments are those of `RevNet`. ``remat_units`` and ``unroll`` are also settable
    attributes.
    """

    options_class = ResNetOptions

    def __init__(
        self,
        units_per_stage: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        *,
        rngs: nnx.Rngs,
        options: ResNetOptions | None = None,
        **overrides: Any,
    ):
        opts = self.resolve(units_per_stage, widths, options, overrides)
        config, plan = self.build_network(opts, halves=False, rngs=rngs)
        self.stages = nnx.List(
            [
                ResStage(
                    opts.block,
                    stage.units,
                    stage.in_channels,
                    stage.out_channels,
                    stride=stage.stride,
                    first=i == 0,
                    config=config,
                    rngs=rngs,
                )
                for i, stage in enumerate(plan)
            ]
        )

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Computes logits; arguments, return value and errors as `RevNet.__call__`."""
        h = self.stem(self.check_input(x), train=train)
        for stage in self.stages:
            h = stage(h, train=train, remat_units=self.remat_units, unroll=self.unroll)
        return self.head_logits(h, train)


# Every option with its default, for `inspect.signature`, `help` and the API reference.
RevNet.__init__.__signature__ = constructor_signature(RevNetOptions, ("units_per_stage", "widths"))
ResNet.__init__.__signature__ = constructor_signature(ResNetOptions, ("units_per_stage", "widths"))


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


# name, class, summary, units per stage, widths, family, twin: one row per preset.
_CIFAR_BASIC = dict(block="basic", stem="cifar")
_CIFAR_BOTTLENECK = dict(block="bottleneck", stem="cifar")
_IMAGENET = dict(block="bottleneck", stem="imagenet")


def _preset(name, cls, summary, units, widths, family, twin=None):
    return register(name, cls, summary, twin=twin, units_per_stage=units, widths=widths, **family)


resnet32 = _preset(
    "resnet32", ResNet, "ResNet-32 (CIFAR): 464,154 parameters for 10 classes.",
    (5, 5, 5), (16, 16, 32, 64), _CIFAR_BASIC,
)
revnet38 = _preset(
    "revnet38", RevNet, "RevNet-38 (CIFAR): 464,890 parameters for 10 classes.",
    (3, 3, 3), (32, 32, 64, 112), _CIFAR_BASIC, twin="resnet32",
)
resnet110 = _preset(
    "resnet110", ResNet, "ResNet-110 (CIFAR): 1,727,962 parameters for 10 classes.",
    (18, 18, 18), (16, 16, 32, 64), _CIFAR_BASIC,
)
revnet110 = _preset(
    "revnet110", RevNet, "RevNet-110 (CIFAR): 1,729,194 parameters for 10 classes.",
    (9, 9, 9), (32, 32, 64, 128), _CIFAR_BASIC, twin="resnet110",
)
resnet164 = _preset(
    "resnet164", ResNet, "ResNet-164 (CIFAR, bottleneck): 1,703,258 parameters for 10 classes.",
    (18, 18, 18), (16, 16, 32, 64), _CIFAR_BOTTLENECK,
)
revnet164 = _preset(
    "revnet164", RevNet, "RevNet-164 (CIFAR, bottleneck): 1,748,778 parameters for 10 classes.",
    (9, 9, 9), (32, 32, 64, 128), _CIFAR_BOTTLENECK, twin="resnet164",
)
resnet50 = _preset(
    "resnet50", ResNet, "Pre-activation ResNet-50 (ImageNet).",
    (3, 4, 6, 3), (64, 64, 128, 256, 512), _IMAGENET,
)
revnet56 = _preset(
    "revnet56", RevNet, "RevNet-56 (ImageNet), the RevNet-104 widths with 2-2-3-2 units.",
    (2, 2, 3, 2), (128, 128, 256, 512, 832), _IMAGENET, twin="resnet50",
)
resnet101 = _preset(
    "resnet101", ResNet, "Pre-activation ResNet-101 (ImageNet): 44,541,480 parameters.",
    (3, 4, 23, 3), (64, 64, 128, 256, 512), _IMAGENET,
)
revnet104 = _preset(
    "revnet104", RevNet, "RevNet-104 (ImageNet): 45,428,072 parameters.",
    (2, 2, 11, 2), (128, 128, 256, 512, 832), _IMAGENET, twin="resnet101",
)
revnet_tiny = _preset(
    "revnet_tiny", RevNet, "A tiny RevNet for tests (two stages of two units, widths 8/8/16).",
    (2, 2), (8, 8, 16), _CIFAR_BASIC, twin="resnet_tiny",
)
resnet_tiny = _preset(
    "resnet_tiny", ResNet, "The tiny RevNet's ResNet twin, for tests.",
    (2, 2), (8, 8, 16), _CIFAR_BASIC,
)
