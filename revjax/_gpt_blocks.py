"""The layers of `revjax.GPT` and `revjax.RevGPT`: normalisation, rotary position embedding,
causal attention (F of a RevGPT unit) and the MLP (G), each with a key-value-cache path for
generation.

Randomness (dropout) follows `revjax.ViT`'s scheme: one PRNG key per call, every block folds in
its `BlockIndex`, so the reversible backward replays the same masks and the modules hold no
RNG state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from revjax._lm_loss import resolve_chunk
from revjax._partition import constrain_batch
from revjax._vit_blocks import Branch, at_least_float32, dropout

Array = jax.Array
Dtype = Any

LN_EPSILON = 1e-5  # GPT-2's LayerNorm epsilon (nanoGPT's too)
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_exact", "swiglu")
POSITIONS = ("learned", "rope")
ATTENTIONS = ("xla", "cudnn", "plain")
ROPE_BASE = 10_000.0


def check_options(name: str, o: Any) -> None:
    """Raises a ValueError naming the first option of ``o`` (a `revjax.LanguageModelOptions`)
    a GPT cannot take."""
    for what in ("vocab_size", "context_length", "embed_dim", "depth", "num_heads"):
        value = getattr(o, what)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {what} must be a positive int, got {value!r}.")
    if o.embed_dim % o.num_heads:
        raise ValueError(
            f"{name}: embed_dim={o.embed_dim} is not divisible by num_heads={o.num_heads}; "
            "each head gets embed_dim / num_heads features."
        )
    for what, value, known in (
        ("norm", o.norm, NORMS),
        ("mlp", o.mlp, MLPS),
        ("position", o.position, POSITIONS),
        ("attention", o.attention, ATTENTIONS),
    ):
        if value not in known:
            raise ValueError(f"{name}: unknown {what} {value!r}; use one of {known}.")
    if o.position == "rope" and (o.embed_dim // o.num_heads) % 2:
        width = o.embed_dim // o.num_heads
        raise ValueError(f"{name}: RoPE needs an even head width, got {width}.")
    for what in ("dropout", "attention_dropout"):
        rate = getattr(o, what)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name}: {what} must lie in [0, 1), got {rate!r}.")
    try:
        resolve_chunk(o.logits_chunk, o.vocab_size)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


class BlockSetting(NamedTuple):
    """The static setting every attention and MLP block of a GPT shares.

    Attributes:
      dim: residual width D.
      num_heads: attention heads.
      hidden: MLP hidden width.
      depth: blocks in the stack (the residual projections' initial scale is
        ``0.02 / sqrt(2 depth)``, GPT-2's).
      bias: biases in the linear layers and the LayerNorms.
      norm: ``"layernorm"`` or ``"rmsnorm"``.
      mlp: ``"gelu"`` (tanh-approximated GELU, GPT-2's), ``"gelu_exact"`` (the erf form,
        PyTorch's ``nn.GELU()`` default, nanoGPT's) or ``"swiglu"``.
      rope: rotary position embedding on queries and keys.
      attention: ``"xla"`` / ``"cudnn"`` (`jax.nn.dot_product_attention`'s implementations;
        cuDNN needs an NVIDIA GPU and 16-bit compute) or ``"plain"`` (einsum and a float32
        softmax; also what attention dropout uses).
      dropout: dropout on each block's output and after the MLP activation.
      attention_dropout: dropout on the attention weights (computed with ``"plain"``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    dim: int
    num_heads: int
    hidden: int
    depth: int
    bias: bool
    norm: str
    mlp: str
    rope: bool
    attention: str
    dropout: float
    attention_dropout: float
    dtype: Dtype
    param_dtype: Dtype


def dense(fan_in: int, fan_out: int, s: BlockSetting, rngs: nnx.Rngs, std: float = 0.02):
    """A linear layer initialised as GPT-2: normal(0, std) kernel, zero bias."""
    return nnx.Linear(
        fan_in,
        fan_out,
        use_bias=s.bias,
        kernel_init=nnx.initializers.normal(stddev=std),
        bias_init=nnx.initializers.zeros,
        dtype=s.dtype,
        param_dtype=s.param_dtype,
        rngs=rngs,
    )


def rows(layer: nnx.Module, x: Array) -> Array:
    """``layer`` (a linear layer) on ``x`` [..., fan_in] as one 2-D matrix product over the
    flattened rows, reshaped back to [..., fan_out]: the same products and sums as on the 3-D
    array, but the weight gradient is a plain [fan_in, rows] x [rows, fan_out] product, which
    XLA:CPU runs much faster than a dot_general contracting two axes (batch and tokens)."""
    out = layer(x.reshape(-1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def norm_layer(dim: int, norm: str, bias: bool, *, dtype, param_dtype, rngs) -> nnx.Module:
    """LayerNorm (two-pass variance, epsilon 1e-5) or RMSNorm over the last axis."""
    if norm == "rmsnorm":
        return nnx.RMSNorm(
            dim, epsilon=LN_EPSILON, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
    # Two-pass variance: the one-pass form loses precision, which the reversible backward
    # would see as rebuild error.
    return nnx.LayerNorm(
        dim,
        epsilon=LN_EPSILON,
        use_bias=bias,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def rope(x: Array, positions: Array) -> Array:
    """Rotary position embedding (the rotate-half layout of GPT-NeoX / LLaMA).

    Args:
      x: queries or keys [N, T, heads, head_dim] (head_dim even).
      positions: int32 [T], each token's position.
    """
    half = x.shape[-1] // 2
    freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [head_dim / 2]
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [T, head_dim / 2]
    cos = jnp.cos(angle)[None, :, None, :]
    sin = jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def plain_attention(q, k, v, mask, rate: float = 0.0, key: Array | None = None) -> Array:
    """``softmax(q k^T / sqrt(head_dim) + mask) v`` with a float32 softmax, and dropout.

    Args:
      q: queries [N, T, heads, head_dim].
      k: keys [N, S, heads, head_dim].
      v: values [N, S, heads, head_dim].
      mask: bool, broadcastable to [N, heads, T, S]; True where a query may attend.
      rate: dropout on the attention weights.
      key: PRNG key of that dropout (None: none).
    """
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q * scale, k)  # [N, heads, T, S]
    logits = logits.astype(at_least_float32(logits.dtype))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = dropout(jax.nn.softmax(logits, axis=-1).astype(v.dtype), rate, key)
    return jnp.einsum("nhqk,nkhd->nqhd", weights, v)


def causal_mask(t: int, s: int, offset: Array | int = 0) -> Array:
    """bool [1, 1, t, s]: query i (at position ``offset + i``) sees keys 0 .. offset + i."""
    rows = jnp.arange(t, dtype=jnp.int32)[:, None] + offset
    return (jnp.arange(s, dtype=jnp.int32)[None, :] <= rows)[None, None]


class CausalAttention(Branch):
    """``dropout(proj(causal MHSA(norm(x))))``: the F of a RevGPT unit, a GPT block's first half.

    One fused ``qkv`` projection (D -> 3D, laid out [q; k; v] x heads x head_dim, as GPT-2's
    ``c_attn``) and an output projection ``proj`` (D -> D, GPT-2's ``c_proj``).

    Args:
      s: the blocks' static setting.
      rngs: initialisation keys.
    """

    def __init__(self, s: BlockSetting, *, rngs: nnx.Rngs):
        self._init_branch(stream=0, depth=s.depth, drop_path_rate=0.0, dtype=s.dtype)
        self.setting = s
        layer = dict(dtype=s.dtype, param_dtype=s.param_dtype, rngs=rngs)
        self.norm = norm_layer(s.dim, s.norm, s.bias, **layer)
        self.qkv = dense(s.dim, 3 * s.dim, s, rngs)
        self.proj = dense(s.dim, s.dim, s, rngs, std=0.02 / math.sqrt(2 * s.depth))

    def _qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        n, t, d = x.shape
        heads = self.setting.num_heads
        qkv = rows(self.qkv, self.norm(x.astype(self.compute_dtype)))
        qkv = qkv.reshape(n, t, 3, heads, d // heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, heads, D/heads] each
        if self.setting.rope:
            q, k = rope(q, positions), rope(k, positions)
        return q, k, v

    def __call__(self, x: Array, key_data: Array | None = None) -> Array:
        """Maps tokens [N, T, D] to the branch output [N, T, D] (compute dtype).

        Args:
          x: the residual stream (any float dtype; computed in the compute dtype).
          key_data: the call's PRNG key data, shared by all blocks; ``None``: no dropout.
        """
        s = self.setting
        (k_attn, k_out, _), _ = self._randomness(key_data)
        n, t, d = x.shape
        x = constrain_batch(x)  # batch-split activations under a mesh (revjax._partition)
        q, k, v = self._qkv(x, jnp.arange(t, dtype=jnp.int32))
        if s.attention == "plain" or (s.attention_dropout > 0.0 and k_attn is not None):
            h = plain_attention(q, k, v, causal_mask(t, t), s.attention_dropout, k_attn)
        else:
            h = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=s.attention)
        h = rows(self.proj, h.reshape(n, t, d))
        return constrain_batch(dropout(h, s.dropout, k_out))

    def decode(self, x: Array, cache: tuple[Array, Array], start: Array):
        """The branch on tokens at positions ``start .. start + T - 1``, with a key-value cache.

        Args:
          x: the residual stream of the new tokens [N, T, D].
          cache: ``(keys, values)``, [N, S, heads, head_dim] each, filled below ``start``.
          start: int32 scalar, the position of the first new token.

        Returns:
          ``(output [N, T, D], cache with the new tokens' keys and values at start ..)``.
        """
        n, t, d = x.shape
        positions = start + jnp.arange(t, dtype=jnp.int32)
        q, k, v = self._qkv(x, positions)
        keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, 1)
        values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, 1)
        mask = causal_mask(t, keys.shape[1], start)
        h = plain_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
        return rows(self.proj, h.reshape(n, t, d)), (keys, values)


class Mlp(Branch):
    """``dropout(fc2(dropout(act(fc1(norm(x))))))``: the G of a RevGPT unit.

    ``act`` is the tanh-approximated GELU (GPT-2's ``gelu_new``), the exact (erf) GELU, or
    SwiGLU: ``silu(gate(h)) * fc1(h)``.

    Args:
      s: the blocks' static setting.
      rngs: initialisation keys.
    """

    def __init__(self, s: BlockSetting, *, rngs: nnx.Rngs):
        self._init_branch(stream=1, depth=s.depth, drop_path_rate=0.0, dtype=s.dtype)
        self.setting = s
        layer = dict(dtype=s.dtype, param_dtype=s.param_dtype, rngs=rngs)
        self.norm = norm_layer(s.dim, s.norm, s.bias, **layer)
        self.fc1 = dense(s.dim, s.hidden, s, rngs)
        self.gate = dense(s.dim, s.hidden, s, rngs) if s.mlp == "swiglu" else None
        self.fc2 = dense(s.hidden, s.dim, s, rngs, std=0.02 / math.sqrt(2 * s.depth))

    def __call__(self, x: Array, key_data: Array | None = None) -> Array:
        """Maps tokens [N, T, D] to the branch output [N, T, D]; arguments as
        `CausalAttention`."""
        (k_hidden, k_out, _), _ = self._randomness(key_data)
        h = self.norm(constrain_batch(x).astype(self.compute_dtype))
        if self.gate is not None:
            h = jax.nn.silu(rows(self.gate, h)) * rows(self.fc1, h)  # [N, T, hidden]
        else:
            h = jax.nn.gelu(rows(self.fc1, h), approximate=self.setting.mlp == "gelu")
        h = dropout(h, self.setting.dropout, k_hidden)
        return constrain_batch(dropout(rows(self.fc2, h), self.setting.dropout, k_out))
