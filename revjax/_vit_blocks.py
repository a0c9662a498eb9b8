"""The layers of `revjax.ViT` and `revjax.RevViT`: patch embedding, the attention and MLP
branches (F and G of a RevViT unit), and the randomness they draw (dropout, drop-path).

Dropout and drop-path take their randomness from one PRNG key per call: every branch folds its
`BlockIndex` (a stacked, untrained variable) into that key, so the reversible backward can
replay the same keys and the modules hold no RNG state.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from revjax._partition import constrain_batch

Array = jax.Array
Dtype = Any

LN_EPSILON = 1e-6  # timm's and big_vision's ViT LayerNorm epsilon


def at_least_float32(dtype: Dtype) -> jnp.dtype:
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


def as_key(rngs: Any) -> Array | None:
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


def linear(fan_in: int, fan_out: int, *, dtype, param_dtype, rngs) -> nnx.Linear:
    """A dense layer initialised as timm / DeiT: truncated normal (std 0.02) kernel, zero bias."""
    return nnx.Linear(
        fan_in,
        fan_out,
        kernel_init=nnx.initializers.truncated_normal(stddev=0.02),
        bias_init=nnx.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def layer_norm(features: int, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    """A LayerNorm with the ViT epsilon (`LN_EPSILON`) and a two-pass variance."""
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


class Branch(nnx.Module):
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


class AttentionBranch(Branch):
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
        self.norm = layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, key_data: Array | None = None) -> Array:
        """Maps tokens [N, T, D] to the branch output [N, T, D] (compute dtype).

        Args:
          x: tokens (any float dtype; computed in the compute dtype).
          key_data: the call's PRNG key data (``jax.random.key_data``), shared by all blocks;
            ``None``: deterministic (evaluation).
        """
        (k_attn, k_out, k_path), rate = self._randomness(key_data)
        n, t, d = x.shape
        h = self.norm(constrain_batch(x).astype(self.compute_dtype))
        qkv = self.qkv(h).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, heads, D/heads] each
        q = q * jnp.asarray(1.0 / math.sqrt(d // self.num_heads), q.dtype)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k)  # [N, heads, T, T]
        # Softmax in float32 at least (bfloat16 logits lose the small weights).
        weights = jax.nn.softmax(logits.astype(at_least_float32(logits.dtype)))
        weights = dropout(weights.astype(v.dtype), self.attention_dropout, k_attn)
        h = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
        h = dropout(self.proj(h), self.dropout, k_out)
        return constrain_batch(drop_path(h, rate, k_path))


class MlpBranch(Branch):
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
        self.norm = layer_norm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, key_data: Array | None = None) -> Array:
        """Maps tokens [N, T, D] to the branch output [N, T, D]; arguments as `AttentionBranch`."""
        (k_hidden, k_out, k_path), rate = self._randomness(key_data)
        h = self.fc1(self.norm(constrain_batch(x).astype(self.compute_dtype)))  # [N, T, hidden]
        h = dropout(jax.nn.gelu(h, approximate=False), self.dropout, k_hidden)
        h = dropout(self.fc2(h), self.dropout, k_out)
        return constrain_batch(drop_path(h, rate, k_path))


def number_blocks(stack: nnx.Module, depth: int) -> None:
    """Sets the `BlockIndex` of every block of a stacked branch: 0 .. depth - 1."""
    stack.index[...] = jnp.arange(depth, dtype=jnp.int32)
