"""Text generation from `revjax.GPT` and `revjax.RevGPT`: sampling with a key-value cache.

The prompt is encoded once (filling every block's cache of keys and values), then each new
token costs one position through the blocks. RevGPT generates the same way: at inference its
units run forward (F reading and extending the cache, then G), with the training forward's
arithmetic; reversibility only matters for the backward pass.

Token t (its position in the output) is drawn with the key ``fold_in(key, t)``, so a sequence
depends on the key and the prompt alone: with the cache or without it (``use_cache=False``
recomputes the whole prefix at every step) the same key gives the same tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

Array = jax.Array

__all__ = ["generate", "sample_next"]


def sample_next(
    logits: Array, key: Array | None, temperature: float | Array, top_k: int | None
) -> Array:
    """Draws one token per row from next-token logits.

    Args:
      logits: [N, vocab] (any float dtype; computed in float32).
      key: PRNG key (unused when ``temperature == 0``).
      temperature: divides the logits; 0 (a Python number) picks the most likely token.
      top_k: keep only the k most likely tokens (None: all).

    Returns:
      int32 [N].
    """
    logits = logits.astype(jnp.float32)
    if isinstance(temperature, int | float) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.asarray(temperature, jnp.float32)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [N, 1], the k-th largest
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _sample(logits, key, temperature, greedy, top_k):
    return sample_next(logits, key, 0 if greedy else temperature, top_k)


# The jitted pieces take the temperature traced (one compile for every temperature) and
# `greedy` / `top_k` static.
@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _prefill(graphdef, state, tokens, key, temperature, greedy, top_k):
    """Encodes ``tokens`` [N, T] into a fresh cache; samples the token that follows."""
    model = nnx.merge(graphdef, state, copy=True)
    logits, cache = model.decode(tokens, model.init_cache(tokens.shape[0]), 0)
    return _sample(logits[:, -1], key, temperature, greedy, top_k), cache


@functools.partial(jax.jit, static_argnums=(0, 7, 8), donate_argnums=(3,))
def _extend(graphdef, state, token, cache, position, key, temperature, greedy, top_k):
    """Runs ``token`` [N] at ``position`` through the cache; samples the token that follows."""
    model = nnx.merge(graphdef, state, copy=True)
    logits, cache = model.decode(token[:, None], cache, position)
    return _sample(logits[:, -1], key, temperature, greedy, top_k), cache


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _recompute(graphdef, state, window, length, key, temperature, greedy, top_k):
    """Runs the whole prefix, ``window[:, :length]`` of a window padded to the context (one
    compile for every length: causal attention keeps the padding out); samples what follows."""
    model = nnx.merge(graphdef, state, copy=True)
    logits = lax.dynamic_index_in_dim(model(window), length - 1, axis=1, keepdims=False)
    return _sample(logits, key, temperature, greedy, top_k)


def _as_key(rngs: Any, temperature: float) -> Array:
    if temperature == 0:
        return jax.random.key(0)  # greedy: never used
    if rngs is None:
        raise ValueError(
            "generate samples with temperature > 0, so it needs randomness: pass "
            "rngs=jax.random.key(seed), or temperature=0 for greedy decoding."
        )
    if isinstance(rngs, nnx.Rngs):
        return rngs()
    if isinstance(rngs, jax.Array) and rngs.dtype == jnp.uint32 and rngs.shape == (2,):
        return jax.random.wrap_key_data(rngs)
    return rngs


def generate(
    model: nnx.Module,
    prompt_tokens: Any,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    rngs: Any = None,
    *,
    use_cache: bool = True,
) -> Array:
    """Continues ``prompt_tokens`` by ``max_new_tokens`` sampled tokens.

    Beyond the model's context, generation keeps going on the most recent tokens: the cached
    path re-encodes the last half context as a fresh prompt whenever the cache is full, the
    recomputing path reads the last ``context_length`` tokens.

    Args:
      model: a `revjax.GPT` or `revjax.RevGPT` (anything with ``decode`` / ``init_cache``).
      prompt_tokens: int token ids [N, T] or [T], at least one token per row.
      max_new_tokens: tokens to add.
      temperature: divides the logits; 0 is greedy decoding.
      top_k: sample among the k most likely tokens only (None: all).
      rngs: a PRNG key (or an `nnx.Rngs`) for sampling; unused when ``temperature == 0``.
      use_cache: keep every block's keys and values (True), or recompute the whole prefix for
        each token (the reference the cache is tested against).

    Returns:
      int32 [N, T + max_new_tokens] (or [T + max_new_tokens] for a 1-D prompt): the prompt
      followed by the new tokens.

    Raises:
      ValueError: an empty or non-integer prompt, negative ``max_new_tokens`` or ``top_k``
        below 1, a negative temperature, sampling without ``rngs``.
    """
    prompt = jnp.asarray(prompt_tokens)
    squeeze = prompt.ndim == 1
    prompt = prompt[None] if squeeze else prompt
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"prompt_tokens must be integer token ids [batch, length] or [length] with at least "
            f"one token, got {prompt.dtype} {tuple(jnp.shape(prompt_tokens))}."
        )
    if max_new_tokens < 0 or (top_k is not None and top_k < 1) or temperature < 0:
        raise ValueError(
            f"generate needs max_new_tokens >= 0, top_k >= 1 (or None) and temperature >= 0, "
            f"got {max_new_tokens}, {top_k}, {temperature}."
        )
    key = _as_key(rngs, temperature)
    graphdef, state = nnx.split(model)
    context = model.context_length
    sampling = (jnp.asarray(temperature, jnp.float32), temperature == 0, top_k)
    seq = np.asarray(prompt, np.int32)
    cache, filled = None, 0  # filled: positions of the cache holding keys and values
    for _ in range(max_new_tokens):
        step_key = jax.random.fold_in(key, seq.shape[1])  # keyed by the new token's index
        if not use_cache:
            window = seq[:, -context:]
            length = window.shape[1]
            window = np.pad(window, ((0, 0), (0, context - length)))
            nxt = _recompute(graphdef, state, jnp.asarray(window), jnp.asarray(length, jnp.int32),
                             step_key, *sampling)
        elif cache is None or filled == context:
            # The first call, or a full cache: encode the most recent tokens as the prompt.
            window = seq[:, -(context if cache is None else max(context // 2, 1)):]
            nxt, cache = _prefill(graphdef, state, jnp.asarray(window), step_key, *sampling)
            filled = window.shape[1]
        else:  # the last token is not in the cache yet: it goes in at `filled`
            position = jnp.asarray(filled, jnp.int32)
            nxt, cache = _extend(graphdef, state, jnp.asarray(seq[:, -1]), cache, position,
                                 step_key, *sampling)
            filled += 1
        seq = np.concatenate([seq, np.asarray(nxt)[:, None]], axis=1)
    result = jnp.asarray(seq)
    return result[0] if squeeze else result
