"""Building blocks of the model zoo: residual functions, shortcuts and units.

Everything follows the official RevNet code (renmengye/revnet-public, ``resnet_model.py`` and
``revnet_model.py``):

* residual functions are pre-activation (BN -> ReLU -> conv), convs have no bias and are
  initialised with a truncated normal of std ``sqrt(2 / (k * k * out))``;
* the first unit of every stage (the "entry" unit) may change stride and width; its shortcuts
  are downsampled (basic: average pool then zero-pad channels evenly on both sides;
  bottleneck: a strided 1x1 projection conv). The official code stores the input of every
  entry unit, also in the first stage, and rebuilds only the other units: so do we.

The stages that chain these units are in `revjax._stages`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from revjax._partition import constrain_batch

Array = jax.Array
Dtype = Any

BLOCKS = ("basic", "bottleneck")


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def conv_init(kernel_size: int, out_features: int) -> Callable:
    """The official conv initialiser: truncated normal (at 2 std), std sqrt(2 / (k*k*out))."""
    return nnx.initializers.truncated_normal(
        stddev=math.sqrt(2.0 / (kernel_size * kernel_size * out_features))
    )


class LayerConfig:
    """Options shared by every layer of one network (BatchNorm settings, dtypes, init).

    Kept as a plain object (not a Module) so it is static: it lands in the GraphDef, never in
    the parameter State.
    """

    def __init__(
        self,
        *,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        bn_fast_variance: bool = False,
        zero_init_last_bn: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.bn_fast_variance = bn_fast_variance
        self.zero_init_last_bn = zero_init_last_bn
        self.dtype = dtype
        self.param_dtype = param_dtype

    def conv(
        self, in_features: int, out_features: int, kernel_size: int, stride: int, rngs: nnx.Rngs
    ) -> nnx.Conv:
        """A bias-free SAME-padded conv with the official initialiser."""
        return nnx.Conv(
            in_features,
            out_features,
            (kernel_size, kernel_size),
            strides=stride,
            padding="SAME",
            use_bias=False,
            kernel_init=conv_init(kernel_size, out_features),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=rngs,
        )

    def batch_norm(self, features: int, rngs: nnx.Rngs, *, zero_scale: bool = False):
        """BatchNorm as in the official configs (decay 0.99, epsilon 1e-3).

        Two-pass variance by default (``bn_fast_variance=False``): the fast E[x^2] - E[x]^2
        form loses precision to cancellation in float32, which BatchNorm then amplifies in the
        rebuilt activations (the "fast variance" rows of ``results/bench_drift.md``, made by
        ``experiments/bench_drift.py``).
        """
        bn = nnx.BatchNorm(
            features,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            use_fast_variance=self.bn_fast_variance,
            scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=rngs,
        )
        # Flax keeps running averages in float32 whatever param_dtype is; a float64 model's
        # float64 batch statistics would then be written into float32 buffers (a lossy scatter
        # that JAX warns about). Keep them in param_dtype, but never below float32.
        stats_dtype = self.param_dtype if jnp.finfo(self.param_dtype).bits >= 32 else jnp.float32
        if bn.mean.dtype != stats_dtype:
            bn.mean = nnx.BatchStat(bn.mean[...].astype(stats_dtype))
            bn.var = nnx.BatchStat(bn.var[...].astype(stats_dtype))
        return bn


def _bn_relu(bn: nnx.BatchNorm, x: Array, train: bool) -> Array:
    return jax.nn.relu(bn(x, use_running_average=not train))


# --------------------------------------------------------------------------------------------
# Residual functions
# --------------------------------------------------------------------------------------------


class BasicFunction(nnx.Module):
    """Pre-activation basic residual function: (BN -> ReLU -> conv3x3) x 2.

    Args:
      in_features: input channels.
      out_features: output channels.
      stride: stride of the first conv.
      preact: apply the leading BN-ReLU. False only for the network's very first unit, whose
        input was just activated by the stem.
      config: shared layer options.
      rngs: initialisation keys.
      mid_features: output channels of the first conv (default ``out_features``); the
        invertible-downsampling RevNet keeps the preset's width here while its carried
        channels grow.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        stride: int = 1,
        preact: bool = True,
        config: LayerConfig,
        rngs: nnx.Rngs,
        mid_features: int | None = None,
    ):
        mid = out_features if mid_features is None else mid_features
        self.bn1 = config.batch_norm(in_features, rngs) if preact else None
        self.conv1 = config.conv(in_features, mid, 3, stride, rngs)
        self.bn2 = config.batch_norm(mid, rngs, zero_scale=config.zero_init_last_bn)
        self.conv2 = config.conv(mid, out_features, 3, 1, rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Applies the function. x: [N, H, W, in] -> [N, H/stride, W/stride, out]."""
        x = constrain_batch(x)  # batch-split activations under a mesh (revjax._partition)
        h = x if self.bn1 is None else _bn_relu(self.bn1, x, train)
        # Every convolution's output too: between two convolutions whose kernels are split
        # over fsdp and tensor, sharding propagation would otherwise pick a layout for the
        # activation from the kernels, and XLA's SPMD partitioner computes such a chain wrongly
        # on small feature maps (tests/test_sharding.py holds the case: a 4x4 map on a
        # (2, 2, 2) mesh).
        h = constrain_batch(self.conv1(h))
        h = _bn_relu(self.bn2, h, train)
        return constrain_batch(self.conv2(h))


class BottleneckFunction(nnx.Module):
    """Pre-activation bottleneck residual function.

    BN -> ReLU -> conv1x1 (out/4, strided) -> BN -> ReLU -> conv3x3 (out/4) -> BN -> ReLU ->
    conv1x1 (out). Args as `BasicFunction`; ``mid_features`` replaces the width out/4.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        stride: int = 1,
        preact: bool = True,
        config: LayerConfig,
        rngs: nnx.Rngs,
        mid_features: int | None = None,
    ):
        mid = out_features // 4 if mid_features is None else mid_features
        self.bn1 = config.batch_norm(in_features, rngs) if preact else None
        self.conv1 = config.conv(in_features, mid, 1, stride, rngs)
        self.bn2 = config.batch_norm(mid, rngs)
        self.conv2 = config.conv(mid, mid, 3, 1, rngs)
        self.bn3 = config.batch_norm(mid, rngs, zero_scale=config.zero_init_last_bn)
        self.conv3 = config.conv(mid, out_features, 1, 1, rngs)

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Applies the function. x: [N, H, W, in] -> [N, H/stride, W/stride, out]."""
        x = constrain_batch(x)  # batch-split activations under a mesh (revjax._partition)
        h = x if self.bn1 is None else _bn_relu(self.bn1, x, train)
        h = constrain_batch(self.conv1(h))  # [N, H/s, W/s, out/4]; as in BasicFunction
        h = constrain_batch(self.conv2(_bn_relu(self.bn2, h, train)))
        return constrain_batch(self.conv3(_bn_relu(self.bn3, h, train)))


def residual_function(block: str, *args, **kwargs) -> nnx.Module:
    """Builds the residual function of a block type (``'basic'`` or ``'bottleneck'``)."""
    if block == "basic":
        return BasicFunction(*args, **kwargs)
    if block == "bottleneck":
        return BottleneckFunction(*args, **kwargs)
    raise ValueError(f"Unknown block {block!r}: use one of {BLOCKS}.")


# --------------------------------------------------------------------------------------------
# Shortcuts
# --------------------------------------------------------------------------------------------


def pool_pad(x: Array, stride: int, out_features: int) -> Array:
    """Parameter-free basic shortcut: average pool by ``stride``, zero-pad channels evenly.

    Pools with SAME padding that does not count the padding, so odd sizes give the same
    spatial shape as the strided SAME conv in F (even sizes: identical to VALID pooling).
    """
    if stride > 1:
        x = nnx.avg_pool(
            x, (stride, stride), strides=(stride, stride), padding="SAME", count_include_pad=False
        )
    extra = out_features - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x  # [N, H/s, W/s, out]


class Shortcut(nnx.Module):
    """Shortcut of an entry unit: identity, pool-and-pad (basic) or 1x1 projection (bottleneck).

    Args:
      block: ``'basic'`` or ``'bottleneck'``.
      in_features: input channels.
      out_features: output channels.
      stride: spatial stride.
      config: shared layer options.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        block: str,
        in_features: int,
        out_features: int,
        *,
        stride: int,
        config: LayerConfig,
        rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.out_features = out_features
        changes = stride != 1 or in_features != out_features
        if block == "bottleneck" and changes:
            self.project = config.conv(in_features, out_features, 1, stride, rngs)
        else:
            self.project = None

    def __call__(self, x: Array) -> Array:
        """Maps x: [N, H, W, in] to [N, H/stride, W/stride, out]."""
        if self.project is not None:
            return self.project(x)
        return pool_pad(x, self.stride, self.out_features)


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


class ResUnit(nnx.Module):
    """An ordinary pre-activation residual unit: ``y = shortcut(x) + F(x)``.

    Args:
      block: ``'basic'`` or ``'bottleneck'``.
      in_features: input channels.
      out_features: output channels.
      stride: spatial stride (carried by F and the shortcut).
      preact: whether F starts with BN-ReLU (False for the network's first unit only).
      config: shared layer options.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        block: str,
        in_features: int,
        out_features: int,
        *,
        stride: int = 1,
        preact: bool = True,
        config: LayerConfig,
        rngs: nnx.Rngs,
    ):
        self.f = residual_function(
            block, in_features, out_features, stride=stride, preact=preact, config=config, rngs=rngs
        )
        self.shortcut = Shortcut(
            block, in_features, out_features, stride=stride, config=config, rngs=rngs
        )

    def __call__(self, x: Array, *, train: bool) -> Array:
        """Applies the unit. x: [N, H, W, in] -> [N, H/stride, W/stride, out]."""
        return self.shortcut(x) + self.f(x, train=train)


class RevEntryUnit(nnx.Module):
    """The first unit of a RevNet stage, on halves; not reversible (its input is stored).

    ``y1 = S1(x1) + F(x2)``, ``y2 = S2(x2) + G(y1)``: F carries the stride and the width change
    and both shortcuts S1, S2 are downsampled, so the input cannot be rebuilt from the output.

    Args:
      block: ``'basic'`` or ``'bottleneck'``.
      in_features: total input channels (each half gets half).
      out_features: total output channels.
      stride: spatial stride.
      preact: whether F starts with BN-ReLU (False for the network's first unit only).
      config: shared layer options.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        block: str,
        in_features: int,
        out_features: int,
        *,
        stride: int = 1,
        preact: bool = True,
        config: LayerConfig,
        rngs: nnx.Rngs,
    ):
        cin, cout = in_features // 2, out_features // 2
        self.f = residual_function(
            block, cin, cout, stride=stride, preact=preact, config=config, rngs=rngs
        )
        self.g = residual_function(block, cout, cout, config=config, rngs=rngs)
        self.shortcut1 = Shortcut(block, cin, cout, stride=stride, config=config, rngs=rngs)
        self.shortcut2 = Shortcut(block, cin, cout, stride=stride, config=config, rngs=rngs)

    def __call__(self, x1: Array, x2: Array, *, train: bool) -> tuple[Array, Array]:
        """Applies the unit to halves [N, H, W, in/2] -> halves [N, H/s, W/s, out/2].

        The halves keep their own dtype (the carry dtype): F and G may compute in a lower
        precision, and their outputs are cast to the halves' dtype before the addition, as the
        reversible units do.
        """
        # Pooling promotes bfloat16 to float32 (its counts): cast back to the carry dtype.
        s1 = self.shortcut1(x1).astype(x1.dtype)
        y1 = s1 + self.f(x2, train=train).astype(s1.dtype)
        s2 = self.shortcut2(x2).astype(x2.dtype)
        y2 = s2 + self.g(y1, train=train).astype(s2.dtype)
        return y1, y2


# --------------------------------------------------------------------------------------------
# Invertible downsampling (i-RevNet, Jacobsen et al. 2018)
# --------------------------------------------------------------------------------------------


def space_to_depth(x: Array, stride: int) -> Array:
    """Moves each ``stride x stride`` spatial block into channels: [N, H, W, C] -> [N, H/s,
    W/s, s*s*C]. A permutation of the elements, so `depth_to_space` inverts it exactly.

    Raises:
      ValueError: if H or W is not divisible by ``stride``.
    """
    if stride == 1:
        return x
    n, h, w, c = x.shape
    if h % stride or w % stride:
        raise ValueError(
            f"Invertible downsampling by {stride} needs a spatial size divisible by {stride}, got "
            f"{h}x{w} (activation shape {x.shape}): space-to-depth cannot split odd rows or "
            "columns. Use an input size divisible by the product of the strides (e.g. 32x32 "
            "for CIFAR, 224x224 for ImageNet), or downsample='pool'."
        )
    x = x.reshape(n, h // stride, stride, w // stride, stride, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [N, H/s, W/s, s, s, C]
    return x.reshape(n, h // stride, w // stride, stride * stride * c)


def depth_to_space(x: Array, stride: int) -> Array:
    """Inverse of `space_to_depth`: [N, H, W, s*s*C] -> [N, H*s, W*s, C]."""
    if stride == 1:
        return x
    n, h, w, c = x.shape
    c //= stride * stride
    x = x.reshape(n, h, w, stride, stride, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * stride, w * stride, c)


class InvertibleShortcut(nnx.Module):
    """Parameter-free, injective shortcut: space-to-depth by ``stride``, then zero channels.

    ``P(x) = pad(space_to_depth(x, s))``: [N, H, W, in] -> [N, H/s, W/s, out] with ``out >=
    s*s*in``; the left inverse `inverse` drops the padded channels and undoes the
    space-to-depth, exactly (no arithmetic).

    Args:
      in_features: input channels.
      out_features: output channels, at least ``stride**2 * in_features``.
      stride: spatial stride.

    Raises:
      ValueError: if ``out_features < stride**2 * in_features`` (the map would lose elements).
    """

    def __init__(self, in_features: int, out_features: int, *, stride: int):
        moved = stride * stride * in_features
        if out_features < moved:
            raise ValueError(
                f"Invertible downsampling by {stride} turns {in_features} channels into {moved} "
                f"(space-to-depth), which cannot be padded to {out_features}: an injective map "
                f"never drops elements. Use at least {moved} output channels (per half), or "
                "downsample='pool'."
            )
        self.stride = stride
        self.in_features = in_features
        self.out_features = out_features

    def __call__(self, x: Array) -> Array:
        """Maps x: [N, H, W, in] to [N, H/s, W/s, out] (the extra channels are zeros)."""
        x = space_to_depth(x, self.stride)
        extra = self.out_features - x.shape[-1]
        if extra:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x

    def inverse(self, y: Array) -> Array:
        """The left inverse: [N, H/s, W/s, out] -> [N, H, W, in]."""
        moved = self.stride * self.stride * self.in_features
        return depth_to_space(y[..., :moved], self.stride)


class InvertibleEntryUnit(nnx.Module):
    """A reversible stage-entry unit (i-RevNet): ``y1 = P(x1) + F(x2)``, ``y2 = P(x2) + G(y1)``.

    ``P`` is the `InvertibleShortcut` (space-to-depth, zero channels), F carries the stride and
    the width change. Since ``P`` has an exact left inverse, so does the unit:
    ``x2 = P^-1(y2 - G(y1))``, ``x1 = P^-1(y1 - F(x2))``.

    Args:
      block: ``'basic'`` or ``'bottleneck'``.
      in_features: channels per input half.
      out_features: channels per output half, at least ``stride**2 * in_features``.
      mid_features: inner width of F and G (a basic function's first conv, a bottleneck's
        1x1/3x3 convs).
      stride: spatial stride.
      preact: whether F starts with BN-ReLU (False for the network's first unit only).
      config: shared layer options.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        block: str,
        in_features: int,
        out_features: int,
        *,
        mid_features: int,
        stride: int = 1,
        preact: bool = True,
        config: LayerConfig,
        rngs: nnx.Rngs,
    ):
        self.shortcut = InvertibleShortcut(in_features, out_features, stride=stride)
        self.f = residual_function(
            block,
            in_features,
            out_features,
            stride=stride,
            preact=preact,
            mid_features=mid_features,
            config=config,
            rngs=rngs,
        )
        self.g = residual_function(
            block, out_features, out_features, mid_features=mid_features, config=config, rngs=rngs
        )

    def __call__(self, x1: Array, x2: Array, *, train: bool) -> tuple[Array, Array]:
        """Halves [N, H, W, in] -> halves [N, H/s, W/s, out], in the halves' dtype."""
        s1 = self.shortcut(x1)
        y1 = s1 + self.f(x2, train=train).astype(s1.dtype)
        s2 = self.shortcut(x2)
        y2 = s2 + self.g(y1, train=train).astype(s2.dtype)
        return y1, y2

    def inverse(self, y1: Array, y2: Array, *, train: bool) -> tuple[Array, Array]:
        """Rebuilds the input halves from the output halves (BatchNorm mode as the forward)."""
        x2 = self.shortcut.inverse(y2 - self.g(y1, train=train).astype(y2.dtype))
        x1 = self.shortcut.inverse(y1 - self.f(x2, train=train).astype(y1.dtype))
        return x1, x2
