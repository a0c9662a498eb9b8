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

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from revjax._carry import DEFAULT_FRAC_BITS, check_arithmetic
from revjax._checks import check_images
from revjax._coupling import merge_halves
from revjax._options import (
    ModelOptions,
    OptionsModule,
    constructor_signature,
    options_like,
    resolve_options,
    settable,
)
from revjax._sequence import check_exact_every
from revjax._units import default_unroll
from revjax._vit_blocks import (
    AttentionBranch,
    MlpBranch,
    PatchEmbed,
    as_key,
    at_least_float32,
    dropout,
    layer_norm,
    linear,
    number_blocks,
)
from revjax.layers import ReversibleSequence, stacked
from revjax.presets import register

Array = jax.Array
Dtype = Any

POOLS = ("mean", "cls", "avg")

__all__ = [
    "RevViT",
    "RevViTOptions",
    "TransformerOptions",
    "ViT",
    "ViTOptions",
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


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TransformerOptions(ModelOptions):
    """The options `revjax.ViT` and `revjax.RevViT` share (architecture, regularisation, dtypes).

    Attributes:
      image_size: square image side (the position embedding has one entry per patch).
      patch_size: patch side.
      embed_dim: token width D.
      depth: number of blocks (one attention and one MLP sub-block each).
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      num_classes: number of logits.
      in_channels: image channels.
      dropout: dropout after the embedding, in the MLP and after each projection.
      attention_dropout: dropout on the attention weights.
      drop_path_rate: stochastic-depth rate of the last block (linear from 0 at the first).
      unroll: scan unroll over the blocks; None: `revjax.default_unroll` (full on CPU, rolled on
        GPU/TPU). Also settable as an attribute.
      dtype: compute dtype (default ``param_dtype``).
      param_dtype: parameter dtype.
      carry_dtype: dtype of the residual stream, both streams for RevViT (default: float32, or
        float64 for a float64 model): ``dtype=jnp.bfloat16`` computes attention and MLPs in
        bfloat16 while the residual additions (and RevViT's rebuild) stay in float32.

    The class attribute ``ARCHITECTURE`` names the fields that fix the weights' shapes (what
    `RevViT.from_vit` keeps and a checkpoint must match).
    """

    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
        "num_classes", "in_channels",
    )

    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    in_channels: int = 3
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    unroll: int | bool | None = settable(None)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    carry_dtype: Dtype | None = None


@dataclasses.dataclass(frozen=True)
class ViTOptions(TransformerOptions):
    """The options of `revjax.ViT`: the fields of `TransformerOptions` and the following.

    Attributes:
      pool: ``"mean"`` (mean over tokens, as RevViT), ``"cls"`` (a learned class token, the
        original ViT; with it the presets have the published parameter counts) or ``"avg"``
        (timm's ``global_pool="avg"``: a class token is kept, its output is dropped, the patch
        tokens are averaged and the final LayerNorm normalises the average, timm's ``fc_norm``).
      remat_blocks: `jax.checkpoint` every block (each stores only its input): the usual
        gradient-checkpointing baseline for the memory benchmark. Also settable as an attribute.
    """

    pool: str = "mean"
    remat_blocks: bool = settable(False)


@dataclasses.dataclass(frozen=True)
class RevViTOptions(TransformerOptions):
    """The options of `revjax.RevViT`: the fields of `TransformerOptions` and the following.

    Attributes:
      memory_saving: rebuild activations in the backward (custom VJP); False runs the same
        parameters through plain autodiff. Also settable as an attribute.
      exact_every: with memory saving, also store the exact input of every k-th block (see
        `revjax.reversible_sequence`); None (default) stores none, memory flat in depth.
        Also settable as an attribute.
      arithmetic: ``"fixed"`` (default) or ``"float"`` (the paper's). ``"fixed"``: the
        streams are int32 fixed point inside the blocks, so the backward rebuilds them bit for
        bit (see `revjax.ReversibleSequence`); they reach F and G in ``carry_dtype``.
      frac_bits: fraction bits of fixed-point streams.
    """

    memory_saving: bool = settable(True)
    exact_every: int | None = settable(None)
    arithmetic: str = "fixed"
    frac_bits: int = DEFAULT_FRAC_BITS


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class Branches(NamedTuple):
    """Makers of one block's attention and MLP branch (``rngs -> module``), for `stacked`."""

    make_attn: Callable[[nnx.Rngs], AttentionBranch]
    make_mlp: Callable[[nnx.Rngs], MlpBranch]


class _VisionTransformer(OptionsModule):
    """What ViT and RevViT share: options, configuration checks, embeddings, keys, the head."""

    def _resolve(self, options: Any, overrides: dict[str, Any]) -> Any:
        """The constructor's options (keywords over ``options``), kept on the model."""
        options = resolve_options(type(self).__name__, self.options_class, options, overrides)
        self.init_options(options)
        return options

    def _setup(self, o: TransformerOptions, *, cls_token: bool, rngs: nnx.Rngs) -> Branches:
        """Checks the options ``o``, sets the attributes, builds the embeddings."""
        name = type(self).__name__
        for what in (
            "image_size",
            "patch_size",
            "embed_dim",
            "depth",
            "num_heads",
            "num_classes",
            "in_channels",
        ):
            value = getattr(o, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {what} must be a positive int, got {value!r}.")
        if o.image_size % o.patch_size:
            raise ValueError(
                f"{name}: image_size={o.image_size} is not divisible by patch_size="
                f"{o.patch_size}; patches must tile the image. Resize the images or pick a "
                f"patch size that divides {o.image_size}."
            )
        if o.embed_dim % o.num_heads:
            raise ValueError(
                f"{name}: embed_dim={o.embed_dim} is not divisible by num_heads={o.num_heads}; "
                "each head gets embed_dim / num_heads features."
            )
        hidden = int(round(o.mlp_ratio * o.embed_dim))
        if hidden < 1:
            raise ValueError(f"{name}: mlp_ratio={o.mlp_ratio} gives an empty MLP.")
        for what in ("dropout", "attention_dropout", "drop_path_rate"):
            rate = getattr(o, what)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}: {what} must lie in [0, 1), got {rate!r}.")
        self.image_size = o.image_size
        self.patch_size = o.patch_size
        self.embed_dim = o.embed_dim
        self.depth = o.depth
        self.num_heads = o.num_heads
        self.num_classes = o.num_classes
        self.in_channels = o.in_channels
        self.dropout = float(o.dropout)
        self.attention_dropout = float(o.attention_dropout)
        self.drop_path_rate = float(o.drop_path_rate)
        self.dtype = jnp.dtype(o.param_dtype if o.dtype is None else o.dtype)
        self.param_dtype = jnp.dtype(o.param_dtype)
        self.carry_dtype = (
            at_least_float32(self.dtype) if o.carry_dtype is None else jnp.dtype(o.carry_dtype)
        )
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = PatchEmbed(o.in_channels, o.embed_dim, o.patch_size, **layer, rngs=rngs)
        num_tokens = (o.image_size // o.patch_size) ** 2 + int(cls_token)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        shape = (1, num_tokens, o.embed_dim)
        self.pos_embed = nnx.Param(init(rngs.params(), shape, self.param_dtype))
        self.cls_token = (
            nnx.Param(jnp.zeros((1, 1, o.embed_dim), self.param_dtype)) if cls_token else None
        )
        regularise = dict(dropout=self.dropout, depth=o.depth, drop_path_rate=self.drop_path_rate)

        def make_attn(r):
            return AttentionBranch(
                o.embed_dim,
                o.num_heads,
                attention_dropout=o.attention_dropout,
                **regularise,
                **layer,
                rngs=r,
            )

        def make_mlp(r):
            return MlpBranch(o.embed_dim, hidden, **regularise, **layer, rngs=r)

        return Branches(make_attn, make_mlp)

    def _norm_and_head(self, width: int, rngs: nnx.Rngs) -> None:
        """The final LayerNorm and the linear head, on features of ``width``."""
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = layer_norm(width, **layer, rngs=rngs)
        self.head = linear(width, self.num_classes, **layer, rngs=rngs)

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
        key = as_key(rngs)
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
        return self.head(features.astype(self.dtype)).astype(at_least_float32(self.dtype))


class ViT(_VisionTransformer):
    """Vision transformer (pre-LN), RevViT's plain twin: the same sub-blocks, ordinary residuals.

    Its options are the fields of `ViTOptions` (the architecture, ``pool``, regularisation,
    dtypes), taken as keywords or as one ``options`` object; ``model.options`` gives them back.
    ``remat_blocks`` and ``unroll`` are also attributes that may be set after construction.

    Args:
      rngs: initialisation keys (``params`` stream).
      options: a `ViTOptions` (default: its defaults, ViT-B/16); keywords replace its fields.
      **overrides: any field of `ViTOptions`, e.g. ``image_size=32, pool="cls"``.

    Raises:
      TypeError: a keyword that is not a field of `ViTOptions` (the message names the closest
        one).
      ValueError: options the model cannot take (a patch size that does not tile the image...).
    """

    options_class = ViTOptions

    def __init__(self, *, rngs: nnx.Rngs, options: ViTOptions | None = None, **overrides: Any):
        opts = self._resolve(options, overrides)
        if opts.pool not in POOLS:
            raise ValueError(f"ViT: unknown pool {opts.pool!r}; use one of {POOLS}.")
        self.pool = opts.pool
        branches = self._setup(opts, cls_token=opts.pool in ("cls", "avg"), rngs=rngs)
        self.attn = stacked(self.depth, branches.make_attn, rngs)
        self.mlp = stacked(self.depth, branches.make_mlp, rngs)
        number_blocks(self.attn, self.depth)
        number_blocks(self.mlp, self.depth)
        self._norm_and_head(self.embed_dim, rngs)

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

    Its options are the fields of `RevViTOptions`: those of `ViT` without ``pool`` (always the
    mean over tokens) and ``remat_blocks``, plus ``memory_saving``, ``exact_every``,
    ``arithmetic`` and ``frac_bits``. ``memory_saving``, ``exact_every`` and ``unroll`` are
    also attributes that may be set after construction.

    Args:
      rngs: initialisation keys (``params`` stream).
      options: a `RevViTOptions` (default: its defaults); keywords replace its fields.
      **overrides: any field of `RevViTOptions`, e.g. ``arithmetic="float"``.

    Raises:
      TypeError: a keyword that is not a field of `RevViTOptions` (the message names the
        closest one).
      ValueError: options the model cannot take.
    """

    options_class = RevViTOptions

    def __init__(self, *, rngs: nnx.Rngs, options: RevViTOptions | None = None, **overrides):
        opts = self._resolve(options, overrides)
        check_exact_every(opts.exact_every, "RevViT")
        check_arithmetic(opts.arithmetic, opts.frac_bits, owner="RevViT")
        branches = self._setup(opts, cls_token=False, rngs=rngs)
        self.arithmetic, self.frac_bits = opts.arithmetic, opts.frac_bits
        self.blocks = ReversibleSequence(
            branches.make_attn,
            branches.make_mlp,
            opts.depth,
            rngs=rngs,
            unroll=opts.unroll,
            arithmetic=opts.arithmetic,
            frac_bits=opts.frac_bits,
        )
        number_blocks(self.blocks.f, opts.depth)
        number_blocks(self.blocks.g, opts.depth)
        self._norm_and_head(2 * opts.embed_dim, rngs)

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
          **overrides: RevViT-only options (``memory_saving``, ``exact_every``, ...) and
            regularisation (``dropout``, ``drop_path_rate``...); every other field of the
            ViT's options (`TransformerOptions`: the architecture, dtypes) is kept.
        """
        if not isinstance(vit, ViT):
            raise TypeError(f"RevViT.from_vit converts a revjax.ViT, got {type(vit).__name__}.")
        fixed = sorted(set(overrides) & set(TransformerOptions.ARCHITECTURE))
        if fixed:
            raise ValueError(
                f"RevViT.from_vit keeps the ViT's architecture; {fixed} cannot be overridden. "
                "Change the ViT first (revjax.pretrained.load_timm takes image_size and "
                "num_classes)."
            )
        options = options_like(cls.options_class, vit.options, overrides, "RevViT.from_vit")
        rev = cls(options=options, rngs=nnx.Rngs(0) if rngs is None else rngs)
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


# Every option with its default, for `inspect.signature`, `help` and the API reference.
ViT.__init__.__signature__ = constructor_signature(ViTOptions)
RevViT.__init__.__signature__ = constructor_signature(RevViTOptions)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


_IMAGENET = dict(image_size=224, patch_size=16, mlp_ratio=4.0, num_classes=1000)
_TI = dict(embed_dim=192, depth=12, num_heads=3)
_S = dict(embed_dim=384, depth=12, num_heads=6)
_B = dict(embed_dim=768, depth=12, num_heads=12)
# CIFAR (32x32, patch 4: 64 tokens): ViT-Ti widths at depth 8, ~3.6M parameters.
_CIFAR = dict(image_size=32, patch_size=4, embed_dim=192, depth=8, num_heads=3, mlp_ratio=4.0,
              num_classes=10)
# Digits (8x8, patch 2: 16 tokens), for tests and the offline job.
_TINY = dict(image_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
             num_classes=10)

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
