"""Language models: the reversible `RevGPT` and its `GPT` twin (a GPT-2-style decoder).

Both share the embeddings, the pre-norm sub-blocks and the tied output head::

    h       = embed(tokens) + pos_embed[:T]               # [N, T, D]; no pos_embed with RoPE
    attn(x) = dropout(proj(causal MHSA(norm(x))))
    mlp(x)  = dropout(fc2(dropout(gelu(fc1(norm(x))))))  # or SwiGLU
    logits  = norm_f(h) @ embed^T                          # [N, T, vocab], tied head

* `GPT` (Radford et al., 2019): ``h = h + attn(h); h = h + mlp(h)`` per block, the blocks'
  weights stacked and scanned. ``remat="full"`` checkpoints every block (each stores only its
  input, the backward recomputes it) and ``remat="dots"`` keeps the outputs of the matrix
  products without a batch dimension (the projections), the usual JAX alternatives to
  reversibility.
* `RevGPT`: the embedded tokens are duplicated into two streams ``(x1, x2)`` of width D and
  every block is one reversible unit with ``F = attn`` and ``G = mlp``::

      y1 = x1 + F(x2),    y2 = x2 + G(y1)

  through one `revjax.ReversibleSequence` (the backward rebuilds each block's input from its
  output: activation memory flat in depth). The streams are averaged, ``(y1 + y2) / 2``, before
  the final norm and the tied head. So a RevGPT has exactly its twin's parameters, one for one
  (every unit is one GPT block at width D; averaging adds none), and `RevGPT.from_gpt` copies
  a GPT's weights without a new parameter. Its compute per token is the GPT's; only the
  residual stream is twice as wide (two streams of D). Splitting a width-D stream into two
  halves of D/2 instead would quarter each block's parameters and change the model.

Causal masking: token t attends to tokens 0 .. t only, through `jax.nn.dot_product_attention`
(``attention="xla"``, or ``"cudnn"``: the fused kernel on NVIDIA GPUs, with 16-bit compute) or
a plain einsum with a float32 softmax (``"plain"``; also used for attention dropout, which the
fused kernels lack). Generation (`revjax.generate`) runs F and G forward with a key-value cache:
reversibility changes nothing at inference.

Precision: ``dtype`` is the compute dtype; the residual stream (both RevGPT streams) is kept in
``carry_dtype`` (default float32, or float64 for a float64 model). RevGPT's default
``arithmetic="fixed"`` carries the streams as int32 fixed point inside the sequence, so the
backward rebuilds them bit for bit (see `revjax.ReversibleSequence`).

Parameter counts (``bias=True``, learned positions, GELU; derivation in ``tests/test_gpt.py``):
``12 L D^2 + 13 L D + 2 D + (V + C) D`` for L blocks, width D, vocabulary V, context C, e.g.
GPT-2 small 124,439,808; every RevGPT equals its twin.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from revjax._carry import check_arithmetic, make_carry
from revjax._coupling import get_coupling
from revjax._gpt_blocks import BlockSetting, CausalAttention, Mlp, check_options, norm_layer
from revjax._gpt_options import GPTOptions as GPTOptions
from revjax._gpt_options import LanguageModelOptions as LanguageModelOptions
from revjax._gpt_options import RevGPTOptions as RevGPTOptions
from revjax._lm_loss import head_losses, resolve_chunk
from revjax._options import OptionsModule, constructor_signature, options_like, resolve_options
from revjax._sequence import check_exact_every
from revjax._units import default_unroll
from revjax._vit_blocks import as_key, at_least_float32, dropout, number_blocks
from revjax.layers import ReversibleSequence, stacked
from revjax.presets import register

Array = jax.Array
Dtype = Any

REMATS = (None, "full", "dots")

__all__ = [
    "GPT",
    "GPTOptions",
    "LanguageModelOptions",
    "RevGPT",
    "RevGPTOptions",
    "gpt2_small",
    "gpt_1b",
    "gpt_char",
    "gpt_char_cpu",
    "revgpt2_small",
    "revgpt_1b",
    "revgpt_char",
    "revgpt_char_cpu",
]


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class _LanguageModel(OptionsModule):
    """What GPT and RevGPT share: options, checks, embeddings, keys, the tied head, the cache."""

    def _resolve(self, options: Any, overrides: dict[str, Any]) -> Any:
        options = resolve_options(type(self).__name__, self.options_class, options, overrides)
        self.init_options(options)
        return options

    def _setup(self, o: LanguageModelOptions, rngs: nnx.Rngs) -> BlockSetting:
        """Checks the options ``o``, sets the attributes, builds embeddings and final norm."""
        check_options(type(self).__name__, o)
        self.vocab_size = o.vocab_size
        self.context_length = o.context_length
        self.embed_dim = o.embed_dim
        self.depth = o.depth
        self.num_heads = o.num_heads
        self.dropout = float(o.dropout)
        self.attention_dropout = float(o.attention_dropout)
        self.dtype = jnp.dtype(o.param_dtype if o.dtype is None else o.dtype)
        self.param_dtype = jnp.dtype(o.param_dtype)
        self.carry_dtype = (
            at_least_float32(self.dtype) if o.carry_dtype is None else jnp.dtype(o.carry_dtype)
        )
        layer = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nnx.initializers.normal(stddev=0.02)
        self.embed = nnx.Embed(o.vocab_size, o.embed_dim, embedding_init=init, **layer, rngs=rngs)
        self.pos_embed = (
            nnx.Param(init(rngs.params(), (o.context_length, o.embed_dim), self.param_dtype))
            if o.position == "learned"
            else None
        )
        self.norm = norm_layer(o.embed_dim, o.norm, o.bias, **layer, rngs=rngs)
        hidden = o.mlp_ratio * o.embed_dim * (2.0 / 3.0 if o.mlp == "swiglu" else 1.0)
        return BlockSetting(
            dim=o.embed_dim,
            num_heads=o.num_heads,
            hidden=max(int(round(hidden)), 1),
            depth=o.depth,
            bias=o.bias,
            norm=o.norm,
            mlp=o.mlp,
            rope=o.position == "rope",
            attention=o.attention,
            dropout=float(o.dropout),
            attention_dropout=float(o.attention_dropout),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @property
    def uses_dropout_rng(self) -> bool:
        """Whether training draws random numbers (any dropout rate above 0)."""
        return max(self.dropout, self.attention_dropout) > 0.0

    def _keys(self, rngs: Any, train: bool) -> tuple[Array | None, Array | None]:
        """``(embedding key, the blocks' key data)``, or Nones when nothing is random."""
        if not (train and self.uses_dropout_rng):
            return None, None
        key = as_key(rngs)
        if key is None:
            raise ValueError(
                f"{type(self).__name__} has dropout (dropout={self.dropout}, attention_dropout="
                f"{self.attention_dropout}), so training needs randomness: call "
                "model(tokens, train=True, rngs=jax.random.key(step)), or build it with rates 0."
            )
        k_embed, k_blocks = jax.random.split(key)
        return k_embed, jax.random.key_data(k_blocks)

    def _embed(self, tokens: Array, key: Array | None = None, start: Array | int = 0) -> Array:
        """Token ids [N, T] -> the residual stream [N, T, D] in the carry dtype."""
        name = type(self).__name__
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"{name} takes integer token ids [batch, length], got {tokens.dtype} "
                f"{tokens.shape}; add a batch axis with tokens[None] for one sequence."
            )
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"{name}: {tokens.shape[1]} tokens exceed context_length={self.context_length}; "
                "pass the last context_length tokens, or build the model with a longer context."
            )
        # The rows, then their cast (nnx.Embed casts the whole [vocab, D] table first, and its
        # gradient is then a compute-dtype scatter over the whole vocabulary).
        h = jnp.take(self.embed.embedding[...], tokens, axis=0).astype(self.dtype)
        h = h.astype(self.carry_dtype)  # [N, T, D]
        if self.pos_embed is not None:
            pos = lax.dynamic_slice_in_dim(self.pos_embed[...], start, tokens.shape[1])
            h = h + pos.astype(self.carry_dtype)[None]
        return dropout(h, self.dropout, key)

    def _logits(self, h: Array) -> Array:
        """The residual stream [N, T, D] -> float32 logits [N, T, vocab] (tied head)."""
        h = self.norm(h.astype(self.dtype))
        return self.embed.attend(h).astype(at_least_float32(self.dtype))

    def token_losses(self, tokens: Array, targets: Array, *, train: bool = False,
                     rngs: Any = None, label_smoothing: float = 0.0) -> tuple[Array, Array]:
        """Next-token cross-entropy, the head and the loss in chunks of ``logits_chunk`` tokens
        (`LanguageModelOptions`): the full logits never exist. ``train``, ``rngs``: as
        ``__call__``; ``label_smoothing``: as `revjax.train.cross_entropy`.

        Returns ``(losses, correct)``: [N, T] cross-entropies of ``targets`` (int [N, T], the
        token after each position; float32, float64 for a float64 model) and 1.0 where the
        most likely token is the target. Raises ValueError as ``__call__``, and for targets
        of another shape than ``tokens``.
        """
        targets = jnp.asarray(targets)
        if targets.shape != jnp.shape(tokens):
            raise ValueError(
                f"{type(self).__name__}.token_losses: targets {targets.shape} must have the "
                f"tokens' shape {jnp.shape(tokens)} (one next token per position)."
            )
        h = self.norm(self._stream(tokens, train=train, rngs=rngs).astype(self.dtype))
        chunk = resolve_chunk(self.logits_chunk, self.vocab_size)
        return head_losses(h, self.embed.embedding[...], targets, dtype=self.dtype,
                           chunk=chunk, label_smoothing=label_smoothing)

    def _unroll(self) -> int | bool:
        return default_unroll(self.depth) if self.unroll is None else self.unroll

    def init_cache(self, batch_size: int, dtype: Dtype | None = None) -> tuple[Array, Array]:
        """An empty key-value cache for `decode`: ``(keys, values)``, each
        [depth, batch, context_length, heads, head_dim] zeros (``dtype``: the compute dtype)."""
        shape = (
            self.depth,
            batch_size,
            self.context_length,
            self.num_heads,
            self.embed_dim // self.num_heads,
        )
        dtype = self.dtype if dtype is None else dtype
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def decode(
        self, tokens: Array, cache: tuple[Array, Array], start: Array | int
    ) -> tuple[Array, tuple[Array, Array]]:
        """Logits of tokens at positions ``start .. start + T - 1`` given the cache of the
        tokens before them (evaluation mode, no dropout): the inference path of `revjax.generate`.

        Args:
          tokens: int [N, T], the new tokens (the whole prompt at first, then one at a time).
          cache: from `init_cache` or the previous `decode`.
          start: int32 scalar, the position of ``tokens[:, 0]``; ``start + T`` must not exceed
            ``context_length``.

        Returns:
          ``(float32 logits [N, T, vocab], the updated cache)``.
        """
        start = jnp.asarray(start, jnp.int32)
        h = self._embed(tokens, None, start)
        h, cache = self._decode_blocks(h, cache, start)  # each model's blocks with the cache
        return self._logits(h), cache


class GPT(_LanguageModel):
    """GPT-2-style decoder (pre-norm), RevGPT's plain twin: the same blocks, ordinary residuals.

    Its options are the fields of `GPTOptions`, taken as keywords or as one ``options`` object;
    ``remat`` and ``unroll`` are also attributes that may be set after construction.

    Parameters (for sharding rules and checkpoints): ``embed/embedding`` [vocab, D] (also the
    output head), ``pos_embed`` [context, D], the blocks stacked on a leading axis of length
    ``depth``: ``attn/norm/{scale,bias}``, ``attn/qkv/{kernel [L, D, 3D], bias}``,
    ``attn/proj/{kernel [L, D, D], bias}``, ``mlp/norm/...``, ``mlp/fc1/kernel [L, D, hidden]``
    (and ``mlp/gate`` with SwiGLU), ``mlp/fc2/kernel [L, hidden, D]``; ``norm/{scale,bias}``.

    Args:
      rngs: initialisation keys (``params`` stream).
      options: a `GPTOptions` (default: its defaults, GPT-2 small); keywords replace its fields.
      **overrides: any field of `GPTOptions`.

    Raises:
      TypeError: a keyword that is not a field of `GPTOptions`.
      ValueError: options the model cannot take.
    """

    options_class = GPTOptions

    def __init__(self, *, rngs: nnx.Rngs, options: GPTOptions | None = None, **overrides: Any):
        opts = self._resolve(options, overrides)
        if opts.remat not in REMATS:
            raise ValueError(f"GPT: unknown remat {opts.remat!r}; use one of {REMATS}.")
        s = self._setup(opts, rngs)
        self.attn = stacked(self.depth, lambda r: CausalAttention(s, rngs=r), rngs)
        self.mlp = stacked(self.depth, lambda r: Mlp(s, rngs=r), rngs)
        number_blocks(self.attn, self.depth)
        number_blocks(self.mlp, self.depth)

    def __call__(self, tokens: Array, *, train: bool = False, rngs: Any = None) -> Array:
        """Computes next-token logits.

        Args:
          tokens: int token ids [N, T], T <= context_length.
          train: apply dropout (it needs ``rngs``); False: deterministic.
          rngs: a PRNG key (or an `nnx.Rngs` with a ``dropout`` stream) for dropout.

        Returns:
          float32 logits [N, T, vocab_size]; position t depends on tokens 0 .. t only.

        Raises:
          ValueError: tokens that are not integer [N, T] or longer than the context; a
            training call with dropout and no ``rngs``; an unknown ``remat``.
        """
        return self._logits(self._stream(tokens, train=train, rngs=rngs))

    def _stream(self, tokens: Array, *, train: bool, rngs: Any) -> Array:
        """The residual stream after the last block [N, T, D] (carry dtype)."""
        k_embed, key_data = self._keys(rngs, train)
        h = self._embed(tokens, k_embed)  # [N, T, D], carry dtype
        attn_def, attn_state = nnx.split(self.attn)
        mlp_def, mlp_state = nnx.split(self.mlp)

        def block(h, states):
            attn = nnx.merge(attn_def, states[0], copy=True)
            mlp = nnx.merge(mlp_def, states[1], copy=True)
            h = h + attn(h, key_data).astype(h.dtype)
            h = h + mlp(h, key_data).astype(h.dtype)
            return h, None

        if self.remat == "full":
            block = jax.checkpoint(block)
        elif self.remat == "dots":
            block = jax.checkpoint(
                block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            )
        elif self.remat is not None:
            raise ValueError(f"GPT: unknown remat {self.remat!r}; use one of {REMATS}.")
        h, _ = lax.scan(block, h, (attn_state, mlp_state), unroll=self._unroll())
        return h

    def _decode_blocks(self, h, cache, start):
        attn_def, attn_state = nnx.split(self.attn)
        mlp_def, mlp_state = nnx.split(self.mlp)

        def block(h, xs):
            a_state, m_state, keys, values = xs
            attn = nnx.merge(attn_def, a_state, copy=True)
            mlp = nnx.merge(mlp_def, m_state, copy=True)
            out, (keys, values) = attn.decode(h, (keys, values), start)
            h = h + out.astype(h.dtype)
            h = h + mlp(h).astype(h.dtype)
            return h, (keys, values)

        return lax.scan(block, h, (attn_state, mlp_state, *cache), unroll=self._unroll())


class RevGPT(_LanguageModel):
    """Reversible GPT: every block a reversible unit, F = attention, G = MLP, memory flat in depth.

    The embedded tokens enter both streams; the streams leave averaged, into the final norm and
    the tied head. Parameter-matched to its `GPT` twin: the same parameters, one for one.

    Its options are the fields of `RevGPTOptions`: those of `GPT` without ``remat``, plus
    ``memory_saving``, ``exact_every``, ``arithmetic`` and ``frac_bits``. ``memory_saving``,
    ``exact_every`` and ``unroll`` are also attributes that may be set after construction.

    Parameters: as `GPT`'s, with ``blocks/f/...`` for ``attn/...`` and ``blocks/g/...`` for
    ``mlp/...`` (stacked on a leading axis of length ``depth``); ``blocks/carry_peak`` (not a
    parameter) records the fixed-point streams' largest magnitude.

    Args:
      rngs: initialisation keys (``params`` stream).
      options: a `RevGPTOptions` (default: its defaults); keywords replace its fields.
      **overrides: any field of `RevGPTOptions`, e.g. ``arithmetic="float"``.
    """

    options_class = RevGPTOptions

    def __init__(self, *, rngs: nnx.Rngs, options: RevGPTOptions | None = None, **overrides):
        opts = self._resolve(options, overrides)
        check_exact_every(opts.exact_every, "RevGPT")
        check_arithmetic(opts.arithmetic, opts.frac_bits, owner="RevGPT")
        s = self._setup(opts, rngs)
        self.arithmetic, self.frac_bits = opts.arithmetic, opts.frac_bits
        self.blocks = ReversibleSequence(
            lambda r: CausalAttention(s, rngs=r),
            lambda r: Mlp(s, rngs=r),
            opts.depth,
            rngs=rngs,
            unroll=opts.unroll,
            arithmetic=opts.arithmetic,
            frac_bits=opts.frac_bits,
        )
        number_blocks(self.blocks.f, opts.depth)
        number_blocks(self.blocks.g, opts.depth)

    def __call__(self, tokens: Array, *, train: bool = False, rngs: Any = None) -> Array:
        """Computes next-token logits; arguments, return value and errors as `GPT.__call__`."""
        return self._logits(self._stream(tokens, train=train, rngs=rngs))

    def _stream(self, tokens: Array, *, train: bool, rngs: Any) -> Array:
        """The two streams' average after the last block [N, T, D] (carry dtype)."""
        y1, y2 = self.streams(tokens, train=train, rngs=rngs)
        return (y1 + y2) * jnp.asarray(0.5, y1.dtype)

    def streams(
        self, tokens: Array, *, train: bool = False, rngs: Any = None
    ) -> tuple[Array, Array]:
        """The two streams after the last block, [N, T, D] each, in the carry dtype."""
        k_embed, key_data = self._keys(rngs, train)
        h = self._embed(tokens, k_embed)
        context = () if key_data is None else (key_data,)
        return self.blocks.call_with(
            h,
            h,
            context,
            {},
            memory_saving=self.memory_saving,
            exact_every=self.exact_every,
            unroll=self.unroll,
        )

    def _decode_blocks(self, h, cache, start):
        # The forward of the reversible units in their own arithmetic (the same rounding as
        # the training forward), with F reading and extending the cache.
        arith = make_carry(self.arithmetic, self.frac_bits, self.carry_dtype)
        cpl = get_coupling("additive")
        f_def, f_state = nnx.split(self.blocks.f)
        g_def, g_state = nnx.split(self.blocks.g)

        def unit(carry, xs):
            a1, a2 = carry
            fs, gs, keys, values = xs
            attn = nnx.merge(f_def, fs, copy=True)
            mlp = nnx.merge(g_def, gs, copy=True)
            h_f, (keys, values) = attn.decode(arith.view(a2), (keys, values), start)
            b1 = arith.combine(cpl, a1, h_f)
            b2 = arith.combine(cpl, a2, mlp(arith.view(b1)))
            return (b1, b2), (keys, values)

        c = arith.enter(h)
        (y1, y2), cache = lax.scan(unit, (c, c), (f_state, g_state, *cache), unroll=self._unroll())
        y1, y2 = arith.leave(y1), arith.leave(y2)
        return (y1 + y2) * jnp.asarray(0.5, y1.dtype), cache

    @classmethod
    def from_gpt(cls, gpt: GPT, *, rngs: nnx.Rngs | None = None, **overrides: Any) -> RevGPT:
        """A RevGPT carrying a trained `GPT`'s weights, for reversible fine-tuning.

        Re²TAL's rewiring (Zhao et al., CVPR 2023), as `revjax.RevViT.from_vit`: each block's
        attention becomes F and its MLP G; the embeddings, the final norm (now on the streams'
        average) and the tied head are copied. No parameter is new, but the function changes
        (the skip connections moved), so fine-tune before use.

        Args:
          gpt: the trained model.
          rngs: keys for building the RevGPT before its weights are overwritten (default
            ``nnx.Rngs(0)``).
          **overrides: RevGPT-only options (``memory_saving``, ``arithmetic``, ...) and
            regularisation / dtypes; the architecture is the GPT's.
        """
        if not isinstance(gpt, GPT):
            raise TypeError(f"RevGPT.from_gpt converts a revjax.GPT, got {type(gpt).__name__}.")
        fixed = sorted(set(overrides) & set(LanguageModelOptions.ARCHITECTURE))
        if fixed:
            raise ValueError(
                f"RevGPT.from_gpt keeps the GPT's architecture; {fixed} cannot be overridden."
            )
        options = options_like(cls.options_class, gpt.options, overrides, "RevGPT.from_gpt")
        rev = cls(options=options, rngs=nnx.Rngs(0) if rngs is None else rngs)
        nnx.update(rev.embed, nnx.state(gpt.embed, nnx.Param))
        nnx.update(rev.norm, nnx.state(gpt.norm, nnx.Param))
        nnx.update(rev.blocks.f, nnx.state(gpt.attn, nnx.Param))
        nnx.update(rev.blocks.g, nnx.state(gpt.mlp, nnx.Param))
        if gpt.pos_embed is not None:
            rev.pos_embed[...] = gpt.pos_embed[...]
        return rev


# Every option with its default, for `inspect.signature`, `help` and the API reference.
GPT.__init__.__signature__ = constructor_signature(GPTOptions)
RevGPT.__init__.__signature__ = constructor_signature(RevGPTOptions)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

# nanoGPT's character-level Shakespeare shapes (vocabulary: the text's distinct characters;
# 65 for tiny-shakespeare, the trainer passes the prepared dataset's).
_CHAR_CPU = dict(vocab_size=65, context_length=64, embed_dim=128, depth=4, num_heads=4)
_CHAR = dict(vocab_size=65, context_length=256, embed_dim=384, depth=6, num_heads=6, dropout=0.2)
_GPT2_SMALL = dict(vocab_size=50257, context_length=1024, embed_dim=768, depth=12, num_heads=12)
_1B = dict(vocab_size=50257, context_length=2048, embed_dim=2048, depth=24, num_heads=16)


_REV = "reversible (parameters equal the GPT's)"

gpt_char_cpu = register(
    "gpt_char_cpu", GPT, "nanoGPT's CPU character model: 4 blocks, 4 heads, width 128, context "
    "64; 809,856 parameters with 65 characters.", **_CHAR_CPU,
)
revgpt_char_cpu = register(
    "revgpt_char_cpu", RevGPT, f"nanoGPT's CPU character model, {_REV}.", twin="gpt_char_cpu",
    **_CHAR_CPU,
)
gpt_char = register(
    "gpt_char", GPT, "nanoGPT's GPU character model: 6 blocks, 6 heads, width 384, context 256, "
    "dropout 0.2; 10,770,816 parameters with 65 characters.", **_CHAR,
)
revgpt_char = register(
    "revgpt_char", RevGPT, f"nanoGPT's GPU character model, {_REV}.", twin="gpt_char", **_CHAR,
)
gpt2_small = register(
    "gpt2_small", GPT, "GPT-2 small: 12 blocks, 12 heads, width 768, context 1024, vocabulary "
    "50,257; 124,439,808 parameters.", **_GPT2_SMALL,
)
revgpt2_small = register(
    "revgpt2_small", RevGPT, f"GPT-2 small, {_REV}.", twin="gpt2_small", **_GPT2_SMALL,
)
gpt_1b = register(
    "gpt_1b", GPT, "A 1.3B GPT: 24 blocks, 16 heads, width 2048, context 2048, vocabulary "
    "50,257; 1,315,723,264 parameters.", **_1B,
)
revgpt_1b = register("revgpt_1b", RevGPT, f"The 1.3B GPT, {_REV}.", twin="gpt_1b", **_1B)
