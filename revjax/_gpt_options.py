"""The options of `revjax.GPT` and `revjax.RevGPT` (`LanguageModelOptions` and the two models'
own fields), re-exported by `revjax.gpt`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from revjax._carry import DEFAULT_FRAC_BITS
from revjax._options import ModelOptions, settable

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LanguageModelOptions(ModelOptions):
    """The options `revjax.GPT` and `revjax.RevGPT` share (architecture, regularisation, dtypes).

    Attributes:
      vocab_size: tokens in the vocabulary (logits per position).
      context_length: the longest sequence (the learned position embedding has one row per
        position; with RoPE only generation's cache size).
      embed_dim: residual width D.
      depth: number of blocks (one attention and one MLP sub-block each).
      num_heads: attention heads (D must be divisible by it).
      mlp_ratio: MLP hidden width / D (SwiGLU: two thirds of it, keeping the parameters).
      bias: biases in the linear layers and LayerNorms (GPT-2 has them).
      norm: ``"layernorm"`` or ``"rmsnorm"``.
      mlp: ``"gelu"`` (tanh-approximated, GPT-2's), ``"gelu_exact"`` (erf, nanoGPT's) or
        ``"swiglu"``.
      position: ``"learned"`` (a position embedding, GPT-2's) or ``"rope"`` (rotary).
      dropout: dropout after the embedding, in the MLP and after each block's projection.
      attention_dropout: dropout on the attention weights (computed with the plain attention).
      attention: ``"xla"`` or ``"cudnn"`` (`jax.nn.dot_product_attention`'s implementations;
        cuDNN's fused kernel needs an NVIDIA GPU and bfloat16 / float16 compute) or ``"plain"``.
      unroll: scan unroll over the blocks; None: `revjax.default_unroll` (full on CPU, rolled
        on GPU/TPU). Also settable as an attribute.
      logits_chunk: tokens per chunk of the head and loss in `token_losses` (the trainer's
        loss; one chunk's logits exist at a time). None: the largest power of two whose
        float32 logits hold at most 2**24 elements; one pass when the batch fits. Settable.
      dtype: compute dtype (default ``param_dtype``).
      param_dtype: parameter dtype.
      carry_dtype: dtype of the residual stream(s) (default: float32, or float64 for a float64
        model).

    The class attribute ``ARCHITECTURE`` names the fields that fix the weights' shapes.
    """

    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "context_length", "embed_dim", "depth", "num_heads", "mlp_ratio",
        "bias", "norm", "mlp", "position",
    )

    vocab_size: int = 50257
    context_length: int = 1024
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    bias: bool = True
    norm: str = "layernorm"
    mlp: str = "gelu"
    position: str = "learned"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    attention: str = "xla"
    unroll: int | bool | None = settable(None)
    logits_chunk: int | None = settable(None)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    carry_dtype: Dtype | None = None


@dataclasses.dataclass(frozen=True)
class GPTOptions(LanguageModelOptions):
    """The options of `revjax.GPT`: the fields of `LanguageModelOptions` and the following.

    Attributes:
      remat: ``None`` (plain autodiff), ``"full"`` (`jax.checkpoint` every block: each stores
        its input, the backward recomputes it) or ``"dots"`` (also keep the outputs of matrix
        products without batch dimensions: the projections, not the attention scores;
        ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``). Also settable as an
        attribute.
    """

    remat: str | None = settable(None)


@dataclasses.dataclass(frozen=True)
class RevGPTOptions(LanguageModelOptions):
    """The options of `revjax.RevGPT`: the fields of `LanguageModelOptions` and the following.

    Attributes:
      memory_saving: rebuild activations in the backward (custom VJP); False runs the same
        parameters through plain autodiff. Also settable as an attribute.
      exact_every: with memory saving, also store the exact input of every k-th block; None
        (default) stores none. Also settable as an attribute.
      arithmetic: ``"fixed"`` (default: int32 fixed-point streams, rebuilt bit for bit) or
        ``"float"``.
      frac_bits: fraction bits of fixed-point streams.
    """

    memory_saving: bool = settable(True)
    exact_every: int | None = settable(None)
    arithmetic: str = "fixed"
    frac_bits: int = DEFAULT_FRAC_BITS
