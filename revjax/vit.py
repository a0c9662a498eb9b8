"""Vision transformers: the reversible `RevViT` (Mangalam et al., CVPR 2022) and its `ViT` twin.

Both share the patch embedding, the learned position embedding and the pre-LN sub-blocks::

    tokens  = patch_embed(x) + pos_embed                  # [N, T, D], T = (H / p) * (W / p)
    attn(x) = drop_path(dropout(proj(MHSA(LayerNorm(x)))))
    mlp(x)  = drop_path(dropout(fc2(dropout(gelu(fc1(LayerNorm(x)))))))

* `ViT` (Dosovitskiy et al., 2021): ``x = x + attn(x); x = x + mlp(x)`` per block, then a final
  LayerNorm and either the mean over tokens (``pool="mean"``) or a class token
  (``pool="cls"``), then a linear head.
* `RevViT`: the embedded tokens are duplicated into two streams ``(x1, x2)`` and every block is
  one reversible unit with ``F = attn`` and ``G = mlp``::

      y1 = x1 + F(x2),    y2 = x2 + G(y1)

  run through one `revjax.ReversibleSequence` (the backward rebuilds each block's input from
  its output, so activation memory does not grow with depth). At the end the streams are
  concatenated (``[N, T, 2D]``), normalised by a LayerNorm over ``2D`` and mean-pooled over the
  tokens (no class token), then the head maps ``2D`` features to logits: the RevViT authors'
  layout (facebookresearch/SlowFast, ``reversible_mvit.py``, as the paper describes it).

Dropout and drop-path (stochastic depth) take their randomness from one PRNG key per call
(``model(x, train=True, rngs=key)``, the trainer passes a key derived from the step): every
block folds its `BlockIndex` (a stacked, untrained variable) into that key, and the reversible
backward replays the same keys, so its gradients equal plain autodiff's with the same key. The
models hold no RNG state. Drop-path rates grow linearly over the blocks from 0 to
``drop_path_rate`` (as in timm and DeiT).

Precision: ``dtype`` is the compute dtype of every layer; the residual streams (both RevViT
streams, the ViT residual) are kept in ``carry_dtype`` (default: float32, or float64 for a
float64 model), so ``dtype=jnp.bfloat16`` computes attention and MLPs in bfloat16 while the
additions, and RevViT's reconstruction in the backward, stay in float32.

Parameter counts (``pool="cls"`` reproduces timm's ``vit_*_patch16_224``; derivation in
``tests/test_vit.py``): ViT-Ti/16 5,717,416, ViT-S/16 22,050,664, ViT-B/16 86,567,656.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from revjax._carry import DEFAULT_FRAC_BITS, check_arithmetic
from revjax._checks import check_images
from revjax._coupling import merge_halves
from revjax._sequence import check_exact_every
from revjax._units import default_unroll
from revjax.layers import ReversibleSequence, stacked
from revjax.presets import register

Array = jax.Array
Dtype = Any

POOLS = ("mean", "cls", "avg")
LN_EPSILON = 1e-6  # timm's and big_vision's ViT LayerNorm epsilon

__all__ = [
    "RevViT",
    "ViT",
    "revvit_b16",
    "revvit_cifar",
    "revvit_s16",
    "revvit_ti16",
    "revvit_tiny",
    "vit_b16",
    "vit_cifar",
    "vit_s16",
    "vit_ti16",
    "vit_tiny",
]


def _at_least_float32(dtype: Dtype) -> jnp.dtype:
    """``dtype`` if it has 32 bits or more, else float32 (bfloat16 / float16 -> float32)."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout: zeroes each element with probability ``rate``, scales the rest.

    ``key=None`` or ``rate == 0`` is the identity (evaluation).
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def drop_path(x: Array, rate: Array | float | None, key: Array | None) -> Array:
    """Stochastic depth: drops a residual branch for a whole example with probability ``rate``.

    Args:
      x: the branch output [N, ...].
      rate: drop probability, a Python float or a traced scalar (per block inside a scan).
      key: PRNG key; ``None`` is the identity (evaluation).
    """
    if key is None or rate is None or (isinstance(rate, float) and rate == 0.0):
        return x
    rate = jnp.asarray(rate, jnp.float32)
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    scale = (1.0 / keep_prob).astype(x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def _as_key(rngs: Any) -> Array | None:
    """A PRNG key from what the caller passed: a key array, an `nnx.Rngs`, or None."""
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array) and jnp.issubdtype(rngs.dtype, jax.dtypes.prng_key):
        return rngs
    if isinstance(rngs, jax.Array) and rngs.dtype == jnp.uint32 and rngs.shape == (2,):
        return jax.random.wrap_key_data(rngs)  # a raw jax.random.PRNGKey
    raise ValueError(
        f"rngs must be a PRNG key (jax.random.key(0)), an nnx.Rngs with a 'dropout' stream, or "
        f"None; got {type(rngs).__name__} {getattr(rngs, 'shape', '')}."
    )


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _linear(fan_in: int, fan_out: int, *, dtype, param_dtype, rngs) -> nnx.Linear:
    # timm / DeiT: truncated normal (std 0.02) kernels, zero biases.
    return nnx.Linear(
        fan_in,
        fan_out,
        kernel_init=nnx.initializers.truncated_normal(stddev=0.02),
        bias_init=nnx.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _layer_norm(features: int, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    # Two-pass variance: the fast one-pass form loses precision in float32 (as BatchNorm's does:
    # results/bench_drift.md), which the reversible backward would see as reconstruction error.
    return nnx.LayerNorm(
        features,
        epsilon=LN_EPSILON,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patches, linearly projected: a stride-p conv (with bias).

    Args:
      in_channels: image channels.
      embed_dim: token width D.
      patch_size: patch side p.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initialisation keys.
    """

    def __init__(self, in_channels, embed_dim, patch_size, *, dtype, param_dtype, rngs):
        self.conv = nnx.Conv(
            in_channels,
            embed_dim,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            kernel_init=nnx.initializers.lecun_normal(),
            bias_init=nnx.initializers.zeros,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        """Maps images [N, H, W, C] to tokens [N, (H/p) * (W/p), D] (row-major patches)."""
        h = self.conv(x)  # [N, H/p, W/p, D]
        return h.reshape(h.shape[0], -1, h.shape[-1])


class BlockIndex(nnx.Variable):
    """A block's position in its stack (0 .. depth - 1): not trained, set once at construction.

    It picks the block's own random stream (``fold_in(key, index)``) and its drop-path rate
    from the one key a call receives, so F and G need no RNG state of their own.
    """


class _Branch(nnx.Module):
    """What both sub-blocks share: the block index, the random stream and the drop-path rate."""

    def _init_branch(self, *, stream: int, depth: int, drop_path_rate: float, dtype) -> None:
        self.stream = stream  # 0: attention, 1: MLP (different masks from the same block key)
        self.depth = depth
        self.drop_path_rate = drop_path_rate
        self.compute_dtype = dtype
        self.index = BlockIndex(jnp.zeros((), jnp.int32))

    def _randomness(self, key_data: Array | None) -> tuple[tuple, Array | None]:
        """``((k_a, k_b, k_path), drop-path rate)`` of this block; Nones when deterministic."""
        if key_data is None:
            return (None, None, None), None
        index = self.index[...]
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), index)
        keys = tuple(jax.random.split(jax.random.fold_in(key, self.stream), 3))
        rate = None
        if self.drop_path_rate > 0.0:
            # Linear in depth: 0 for the first block, drop_path_rate for the last.
            rate = self.drop_path_rate * index.astype(jnp.float32) / float(max(self.depth - 1, 1))
        return keys, rate


class AttentionBranch(_Branch):
    """``drop_path(dropout(proj(MHSA(LayerNorm(x)))))``: the F of a RevViT unit.

    One fused ``qkv`` projection (D -> 3D) and an output projection (D -> D), as timm's ViT:
    ``4 D^2 + 4 D`` parameters plus the LayerNorm's ``2 D``.

    Args:
      dim: token width D.
      num_heads: attention heads (D must be divisible by it).
      attention_dropout: dropout on the attention weights.
      dropout: dropout on the projected output.
      depth: blocks in the stack (for the drop-path rate).
      drop_path_rate: drop-path rate of the last block.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        dim,
        num_heads,
        *,
        attention_dropout,
        dropout,
        depth,
        drop_path_rate,
        dtype,
        param_dtype,
        rngs,
    ):
        self._init_branch(stream=0, depth=depth, drop_path_rate=drop_path_rate, dtype=dtype)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.norm = _layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = _linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = _linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, key_data: Array | None = None) -> Array:
        """Maps tokens [N, T, D] to the branch output [N, T, D] (compute dtype).

        Args:
          x: tokens (any float dtype; computed in the compute dtype).
          key_data: the call's PRNG key data (``jax.random.key_data``), shared by all blocks;
            ``None``: deterministic (evaluation).
        """
        (k_attn, k_out, k_path), rate = self._randomness(key_data)
        n, t, d = x.shape
        h = self.norm(x.astype(self.compute_dtype))
        qkv = self.qkv(h).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, heads, D/heads] each
        q = q * jnp.asarray(1.0 / math.sqrt(d // self.num_heads), q.dtype)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k)  # [N, heads, T, T]
        # Softmax in float32 at least (bfloat16 logits lose the small weights).
        weights = jax.nn.softmax(logits.astype(_at_least_float32(logits.dtype)))
        weights = dropout(weights.astype(v.dtype), self.attention_dropout, k_attn)
        h = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
        h = dropout(self.proj(h), self.dropout, k_out)
        return drop_path(h, rate, k_path)


class MlpBranch(_Branch):
    """``drop_path(dropout(fc2(dropout(gelu(fc1(LayerNorm(x)))))))``: the G of a RevViT unit.

    Args:
      dim: token width D.
      hidden: hidden width (``mlp_ratio * D``).
      dropout: dropout after the activation and after ``fc2``.
      depth: blocks in the stack (for the drop-path rate).
      drop_path_rate: drop-path rate of the last block.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      rngs: initialisation keys.
    """

    def __init__(self, dim, hidden, *, dropout, depth, drop_path_rate, dtype, param_dtype, rngs):
        self._init_branch(stream=1, depth=depth, drop_path_rate=drop_path_rate, dtype=dtype)
        self.dropout = dropout
        self.norm = _layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = _linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = _linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, key_data: Array | None = None) -> Array:
        """Maps tokens [N, T, D] to the branch output [N, T, D]; arguments as `AttentionBranch`."""
        (k_hidden, k_out, k_path), rate = self._randomness(key_data)
        h = self.fc1(self.norm(x.astype(self.compute_dtype)))  # [N, T, hidden]
        h = dropout(jax.nn.gelu(h, approximate=False), self.dropout, k_hidden)
        h = dropout(self.fc2(h), self.dropout, k_out)
        return drop_path(h, rate, k_path)


def _number_blocks(stack: nnx.Module, depth: int) -> None:
    """Sets the `BlockIndex` of every block of a stacked branch: 0 .. depth - 1."""
    stack.index[...] = jnp.arange(depth, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class _VisionTransformer(nnx.Module):
    """What ViT and RevViT share: configuration checks, embeddings, keys and the input check."""

    def _setup(
        self,
        *,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_classes: int,
        in_channels: int,
        dropout: float,
        attention_dropout: float,
        drop_path_rate: float,
        unroll: int | bool | None,
        dtype: Dtype | None,
        param_dtype: Dtype,
        carry_dtype: Dtype | None,
        cls_token: bool,
        rngs: nnx.Rngs,
    ) -> dict:
        name = type(self).__name__
        for what, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("embed_dim", embed_dim),
            ("depth", depth),
            ("num_heads", num_heads),
            ("num_classes", num_classes),
            ("in_channels", in_channels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {what} must be a positive int, got {value!r}.")
        if image_size % patch_size:
            raise ValueError(
                f"{name}: image_size={image_size} is not divisible by patch_size={patch_size}; "
                "patches must tile the image. Resize the images or pick a patch size that "
                f"divides {image_size}."
            )
        if embed_dim % num_heads:
            raise ValueError(
                f"{name}: embed_dim={embed_dim} is not divisible by num_heads={num_heads}; each "
                "head gets embed_dim / num_heads features."
            )
        hidden = int(round(mlp_ratio * embed_dim))
        if hidden < 1:
            raise ValueError(f"{name}: mlp_ratio={mlp_ratio} gives an empty MLP.")
        for what, rate in (
            ("dropout", dropout),
            ("attention_dropout", attention_dropout),
            ("drop_path_rate", drop_path_rate),
        ):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}: {what} must lie in [0, 1), got {rate!r}.")
        self.image_size = image_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.drop_path_rate = float(drop_path_rate)
        self.unroll = unroll
        self.dtype = jnp.dtype(param_dtype if dtype is None else dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.carry_dtype = (
            _at_least_float32(self.dtype) if carry_dtype is None else jnp.dtype(carry_dtype)
        )
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size, **layer, rngs=rngs)
        num_tokens = (image_size // patch_size) ** 2 + int(cls_token)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, num_tokens, embed_dim), param_dtype))
        self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim), param_dtype)) if cls_token else None

        def make_attn(r):
            return AttentionBranch(
                embed_dim,
                num_heads,
                attention_dropout=attention_dropout,
                dropout=dropout,
                depth=depth,
                drop_path_rate=float(drop_path_rate),
                **layer,
                rngs=r,
            )

        def make_mlp(r):
            return MlpBranch(
                embed_dim,
                hidden,
                dropout=dropout,
                depth=depth,
                drop_path_rate=float(drop_path_rate),
                **layer,
                rngs=r,
            )

        return dict(make_attn=make_attn, make_mlp=make_mlp, layer=layer)

    @property
    def uses_dropout_rng(self) -> bool:
        """Whether training draws random numbers (any dropout or drop-path rate above 0)."""
        return max(self.dropout, self.attention_dropout, self.drop_path_rate) > 0.0

    def _keys(self, rngs: Any, train: bool) -> tuple[Array | None, Array | None]:
        """``(embedding key, the blocks' key data)``, or Nones when nothing is random.

        Every block gets the same key data and folds in its own `BlockIndex`.
        """
        if not (train and self.uses_dropout_rng):
            return None, None
        key = _as_key(rngs)
        if key is None:
            raise ValueError(
                f"{type(self).__name__} has dropout / drop-path (dropout={self.dropout}, "
                f"attention_dropout={self.attention_dropout}, drop_path_rate="
                f"{self.drop_path_rate}), so training needs randomness: call "
                "model(x, train=True, rngs=jax.random.key(step)), or build it with all rates 0."
            )
        k_embed, k_blocks = jax.random.split(key)
        return k_embed, jax.random.key_data(k_blocks)

    def _embed(self, x: Array, key: Array | None) -> Array:
        """Images [N, H, W, C] -> tokens [N, T, D] in the carry dtype (class token first)."""
        check_images(type(self).__name__, x, self.in_channels, self.image_size)
        tokens = self.patch_embed(x.astype(self.dtype)).astype(self.carry_dtype)  # [N, T, D]
        if self.cls_token is not None:
            cls = jnp.broadcast_to(
                self.cls_token[...].astype(self.carry_dtype), (x.shape[0], 1, self.embed_dim)
            )
            tokens = jnp.concatenate([cls, tokens], axis=1)  # [N, 1 + T, D]
        tokens = tokens + self.pos_embed[...].astype(self.carry_dtype)
        return dropout(tokens, self.dropout, key)

    def _logits(self, features: Array) -> Array:
        """Pooled features [N, width] -> float32 logits [N, classes]."""
        return self.head(features.astype(self.dtype)).astype(_at_least_float32(self.dtype))


class ViT(_VisionTransformer):
    """Vision transformer (pre-LN), RevViT's plain twin: the same sub-blocks, ordinary residuals.

    Args:
      image_size: square image side (the position embedding has one entry per patch).
      patch_size: patch side.
      embed_dim: token width D.
      depth: number of blocks (one attention and one MLP sub-block each).
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      num_classes: number of logits.
      in_channels: image channels.
      pool: ``"mean"`` (mean over tokens, as RevViT), ``"cls"`` (a learned class token, the
        original ViT; with it the presets have the published parameter counts) or ``"avg"``
        (timm's ``global_pool="avg"``: a class token is kept, its output is dropped, the patch
        tokens are averaged and the final LayerNorm normalises the average, timm's ``fc_norm``).
      dropout: dropout after the embedding, in the MLP and after each projection.
      attention_dropout: dropout on the attention weights.
      drop_path_rate: stochastic-depth rate of the last block (linear from 0 at the first).
      unroll: scan unroll over the blocks; None: `revjax.default_unroll` (full on CPU, rolled on
        GPU/TPU).
      remat_blocks: `jax.checkpoint` every block (each stores only its input): the usual
        gradient-checkpointing baseline for the memory benchmark. Also settable as an attribute.
      dtype: compute dtype (default ``param_dtype``).
      param_dtype: parameter dtype.
      carry_dtype: dtype of the residual stream (default: float32, or float64 for a float64
        model): ``dtype=jnp.bfloat16`` keeps the residual additions in float32.
      rngs: initialisation keys (``params`` stream).
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        pool: str = "mean",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        unroll: int | bool | None = None,
        remat_blocks: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_dtype: Dtype | None = None,
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"ViT: unknown pool {pool!r}; use one of {POOLS}.")
        parts = self._setup(
            image_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            in_channels=in_channels,
            dropout=dropout,
            attention_dropout=attention_dropout,
            drop_path_rate=drop_path_rate,
            unroll=unroll,
            dtype=dtype,
            param_dtype=param_dtype,
            carry_dtype=carry_dtype,
            cls_token=pool in ("cls", "avg"),
            rngs=rngs,
        )
        self.pool = pool
        self.remat_blocks = remat_blocks
        self.attn = stacked(depth, parts["make_attn"], rngs)
        self.mlp = stacked(depth, parts["make_mlp"], rngs)
        _number_blocks(self.attn, depth)
        _number_blocks(self.mlp, depth)
        self.norm = _layer_norm(embed_dim, **parts["layer"], rngs=rngs)
        self.head = _linear(embed_dim, num_classes, **parts["layer"], rngs=rngs)

    def __call__(self, x: Array, *, train: bool = False, rngs: Any = None) -> Array:
        """Computes logits.

        Args:
          x: images [N, H, W, in_channels], floating point.
          train: apply dropout / drop-path (they need ``rngs``); False: deterministic.
          rngs: a PRNG key (or an `nnx.Rngs` with a ``dropout`` stream) for dropout and
            drop-path; unused when ``train`` is False or every rate is 0.

        Returns:
          logits [N, num_classes] (float32 for half-precision compute).

        Raises:
          ValueError: wrong rank, channels, image size or dtype; a training call with dropout
            and no ``rngs``.
        """
        k_embed, key_data = self._keys(rngs, train)
        h = self._embed(x, k_embed)  # [N, T, D], carry dtype
        attn_def, attn_state = nnx.split(self.attn)
        mlp_def, mlp_state = nnx.split(self.mlp)

        def block(h, states):
            attn = nnx.merge(attn_def, states[0], copy=True)
            mlp = nnx.merge(mlp_def, states[1], copy=True)
            h = h + attn(h, key_data).astype(h.dtype)
            h = h + mlp(h, key_data).astype(h.dtype)
            return h, None

        if self.remat_blocks:
            block = jax.checkpoint(block)
        unroll = default_unroll(self.depth) if self.unroll is None else self.unroll
        h, _ = lax.scan(block, h, (attn_state, mlp_state), unroll=unroll)
        if self.pool == "avg":  # timm's fc_norm: normalise the mean of the patch tokens
            return self._logits(self.norm(jnp.mean(h[:, 1:], axis=1).astype(self.dtype)))
        h = self.norm(h.astype(self.dtype))
        features = h[:, 0] if self.pool == "cls" else jnp.mean(h, axis=1)  # [N, D]
        return self._logits(features)


class RevViT(_VisionTransformer):
    """Reversible vision transformer (Mangalam et al., CVPR 2022).

    Tokens are duplicated into two streams; each block is a reversible unit with F = LayerNorm +
    multi-head self-attention and G = LayerNorm + MLP, all blocks one `reversible_sequence`
    (activation memory flat in depth); the streams are concatenated, normalised (LayerNorm over
    ``2 D``), mean-pooled and classified.

    It takes the arguments of `ViT` (no ``pool``: always the mean over tokens; no
    ``remat_blocks``) and the following.

    Args:
      memory_saving: rebuild activations in the backward (custom VJP); False runs the same
        parameters through plain autodiff. Also settable as an attribute.
      exact_every: with memory saving, also store the exact input of every k-th block (see
        `revjax.reversible_sequence`); None (default) stores none, memory flat in depth.
        Also settable as an attribute.
      carry_dtype: dtype of the two streams (default: float32, or float64 for a float64
        model): with ``dtype=jnp.bfloat16`` F and G compute in bfloat16 while the streams are
        added and rebuilt in float32.
      arithmetic: ``"fixed"`` (default) or ``"float"`` (the paper's). ``"fixed"``: the
        streams are int32 fixed point inside the blocks, so the backward rebuilds them bit for
        bit (see `revjax.ReversibleSequence`); they reach F and G in ``carry_dtype``.
      frac_bits: fraction bits of fixed-point streams.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        memory_saving: bool = True,
        exact_every: int | None = None,
        unroll: int | bool | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_dtype: Dtype | None = None,
        arithmetic: str = "fixed",
        frac_bits: int = DEFAULT_FRAC_BITS,
        rngs: nnx.Rngs,
    ):
        check_exact_every(exact_every, "RevViT")
        check_arithmetic(arithmetic, frac_bits, owner="RevViT")
        parts = self._setup(
            image_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            in_channels=in_channels,
            dropout=dropout,
            attention_dropout=attention_dropout,
            drop_path_rate=drop_path_rate,
            unroll=unroll,
            dtype=dtype,
            param_dtype=param_dtype,
            carry_dtype=carry_dtype,
            cls_token=False,
            rngs=rngs,
        )
        self.memory_saving = memory_saving
        self.exact_every = exact_every
        self.arithmetic, self.frac_bits = arithmetic, frac_bits
        self.blocks = ReversibleSequence(
            parts["make_attn"],
            parts["make_mlp"],
            depth,
            rngs=rngs,
            unroll=unroll,
            arithmetic=arithmetic,
            frac_bits=frac_bits,
        )
        _number_blocks(self.blocks.f, depth)
        _number_blocks(self.blocks.g, depth)
        self.norm = _layer_norm(2 * embed_dim, **parts["layer"], rngs=rngs)
        self.head = _linear(2 * embed_dim, num_classes, **parts["layer"], rngs=rngs)

    def __call__(self, x: Array, *, train: bool = False, rngs: Any = None) -> Array:
        """Computes logits; arguments, return value and errors as `ViT.__call__`."""
        x1, x2 = self.streams(x, train=train, rngs=rngs)
        h = merge_halves(x1, x2).astype(self.dtype)  # [N, T, 2D]
        return self._logits(jnp.mean(self.norm(h), axis=1))  # [N, 2D] -> [N, classes]

    @classmethod
    def from_vit(cls, vit: ViT, *, rngs: nnx.Rngs | None = None, **overrides: Any) -> RevViT:
        """A RevViT carrying a trained `ViT`'s weights, for reversible fine-tuning.

        Re²TAL's rewiring (Zhao et al., CVPR 2023): the residual sequence ``z_{k+1} = z_k +
        R_k(z_k)`` of the ViT's sub-blocks (attention, MLP, attention, ...) becomes ``z_{k+1} =
        z_{k-1} + R_k(z_k)``, which is RevViT's coupling with each block's attention as F and
        its MLP as G. Every block parameter, the patch embedding and the position embedding
        are copied; the class token (and its position entry) is dropped, since RevViT
        mean-pools. The final LayerNorm over both streams starts as the ViT's norm on each
        stream (scale and bias tiled) and the head as the ViT's head on the streams' average
        (kernel ``[W; W] / 2``), so while the two streams agree the head sees what the ViT's
        would; no other parameter is new. The function changes (the skip connections moved),
        so fine-tune before use.

        Args:
          vit: the trained model.
          rngs: keys for building the RevViT before its weights are overwritten (default
            ``nnx.Rngs(0)``).
          **overrides: RevViT-only arguments (``memory_saving``, ``exact_every``, ...) and
            regularisation (``dropout``, ``drop_path_rate``...); the architecture is the ViT's.
        """
        return _rev_vit_from_vit(cls, vit, rngs, overrides)

    def streams(self, x: Array, *, train: bool = False, rngs: Any = None) -> tuple[Array, Array]:
        """The two streams after the last block, [N, T, D] each, in the carry dtype."""
        k_embed, key_data = self._keys(rngs, train)
        tokens = self._embed(x, k_embed)  # [N, T, D]
        # The blocks' key data is a context input (shared by every unit; integer, so it gets
        # no gradient); each block folds in its index, and the backward replays the same keys.
        context = () if key_data is None else (key_data,)
        return self.blocks.call_with(
            tokens,
            tokens,
            context,
            {},
            memory_saving=self.memory_saving,
            exact_every=self.exact_every,
            unroll=self.unroll,
        )


_ARCHITECTURE = (
    "image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes",
    "in_channels",
)


def _rev_vit_from_vit(cls: type, vit: ViT, rngs: nnx.Rngs | None, overrides: dict) -> RevViT:
    """`RevViT.from_vit`'s body: build the twin, then copy the parameters."""
    if not isinstance(vit, ViT):
        raise TypeError(f"RevViT.from_vit converts a revjax.ViT, got {type(vit).__name__}.")
    fixed = sorted(set(overrides) & set(_ARCHITECTURE))
    if fixed:
        raise ValueError(
            f"RevViT.from_vit keeps the ViT's architecture; {fixed} cannot be overridden. "
            "Change the ViT first (revjax.pretrained.load_timm takes image_size and num_classes)."
        )
    arch = dict(
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        embed_dim=vit.embed_dim,
        depth=vit.depth,
        num_heads=vit.num_heads,
        mlp_ratio=vit.mlp.fc1.kernel.shape[-1] / vit.embed_dim,
        num_classes=vit.num_classes,
        in_channels=vit.in_channels,
        dropout=vit.dropout,
        attention_dropout=vit.attention_dropout,
        drop_path_rate=vit.drop_path_rate,
        unroll=vit.unroll,
        dtype=vit.dtype,
        param_dtype=vit.param_dtype,
        carry_dtype=vit.carry_dtype,
    )
    rev = cls(**{**arch, **overrides}, rngs=nnx.Rngs(0) if rngs is None else rngs)
    nnx.update(rev.patch_embed, nnx.state(vit.patch_embed, nnx.Param))
    nnx.update(rev.blocks.f, nnx.state(vit.attn, nnx.Param))
    nnx.update(rev.blocks.g, nnx.state(vit.mlp, nnx.Param))
    pos = vit.pos_embed[...]
    rev.pos_embed[...] = pos[:, 1:] if vit.cls_token is not None else pos  # [1, T, D]
    for name in ("scale", "bias"):
        getattr(rev.norm, name)[...] = jnp.tile(getattr(vit.norm, name)[...], 2)  # [2D]
    kernel = vit.head.kernel[...]  # [D, classes]
    rev.head.kernel[...] = jnp.concatenate([kernel, kernel], axis=0) / 2  # [2D, classes]
    rev.head.bias[...] = vit.head.bias[...]
    return rev


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


_IMAGENET = dict(image_size=224, patch_size=16, mlp_ratio=4.0, num_classes=1000)
_TI = dict(embed_dim=192, depth=12, num_heads=3)
_S = dict(embed_dim=384, depth=12, num_heads=6)
_B = dict(embed_dim=768, depth=12, num_heads=12)
# CIFAR (32x32, patch 4: 64 tokens): ViT-Ti widths at depth 8, ~3.6M parameters.
_CIFAR = dict(
    image_size=32,
    patch_size=4,
    embed_dim=192,
    depth=8,
    num_heads=3,
    mlp_ratio=4.0,
    num_classes=10,
)
# Digits (8x8, patch 2: 16 tokens), for tests and the offline job.
_TINY = dict(
    image_size=8,
    patch_size=2,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    num_classes=10,
)

vit_ti16 = register(
    "vit_ti16", ViT, "ViT-Ti/16 (224x224); with pool='cls': 5,717,416 parameters.",
    **_IMAGENET, **_TI,
)
vit_s16 = register(
    "vit_s16", ViT, "ViT-S/16 (224x224); with pool='cls': 22,050,664 parameters.",
    **_IMAGENET, **_S,
)
vit_b16 = register(
    "vit_b16", ViT, "ViT-B/16 (224x224); with pool='cls': 86,567,656 parameters.",
    **_IMAGENET, **_B,
)
revvit_ti16 = register(
    "revvit_ti16", RevViT, "RevViT-Ti/16 (224x224): 5,909,416 parameters.", twin="vit_ti16",
    **_IMAGENET, **_TI,
)
revvit_s16 = register(
    "revvit_s16", RevViT, "RevViT-S/16 (224x224): 22,434,664 parameters.", twin="vit_s16",
    **_IMAGENET, **_S,
)
revvit_b16 = register(
    "revvit_b16", RevViT, "RevViT-B/16 (224x224): 87,335,656 parameters.", twin="vit_b16",
    **_IMAGENET, **_B,
)
vit_cifar = register(
    "vit_cifar", ViT, "A ViT for 32x32 images (patch 4, D 192, 8 blocks, 3 heads).", **_CIFAR
)
revvit_cifar = register(
    "revvit_cifar", RevViT, "The CIFAR ViT's reversible twin (patch 4, D 192, 8 blocks).",
    twin="vit_cifar", **_CIFAR,
)
vit_tiny = register(
    "vit_tiny", ViT, "A tiny ViT for 8x8 digits and tests (patch 2, D 32, 2 blocks).", **_TINY
)
revvit_tiny = register(
    "revvit_tiny", RevViT, "The tiny ViT's reversible twin (patch 2, D 32, 2 blocks).",
    twin="vit_tiny", **_TINY,
)
