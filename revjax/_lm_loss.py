"""The language models' output head and next-token cross-entropy, in chunks and tiles.

A tied head maps every position's final stream to float32 logits over the vocabulary: for a
large vocabulary (GPT-2's 50,257) and a long context those logits, their gradient and their
casts are the largest buffers of a training step, and they do not shrink with depth or with
reversibility. `head_losses` evaluates the head and the cross-entropy over chunks of the
batch's tokens and, within a chunk, over tiles of the vocabulary: a running maximum and sum
give each token's log-sum-exp (online softmax), so neither the whole logits nor a
compute-dtype copy of the whole [vocab, D] table exist. Its custom backward recomputes each
tile's logits from the chunk's stream and its saved log-sum-exp, and adds each tile's part of
the embedding's gradient, formed as a float32 matrix product, into the float32 gradient in
place: the only [vocab, D] buffers are the parameter and its gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

Array = jax.Array

# The automatic chunk: the largest power of two of tokens whose float32 logits hold at most
# this many elements (64 MiB); a batch with fewer tokens takes one pass without a loop.
AUTO_CHUNK_ELEMENTS = 2**24
# Vocabulary rows per tile: a power of two with at most this many elements in a chunk's logits
# tile [chunk, rows] and in the table's tile [rows, D] (16 MiB in float32).
TILE_ELEMENTS = 2**22


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Per-example softmax cross-entropy against integer labels, optionally label-smoothed.

    With smoothing ``a`` the target is ``(1 - a) * one_hot + a / classes``
    (`optax.smooth_labels`); ``a = 0`` is `optax.softmax_cross_entropy_with_integer_labels`.
    """
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))


def resolve_chunk(chunk: int | None, vocab_size: int) -> int:
    """Tokens per chunk: ``chunk``, or for None the automatic one (`AUTO_CHUNK_ELEMENTS`)."""
    if chunk is None:
        tokens = max(AUTO_CHUNK_ELEMENTS // vocab_size, 1)
        return 1 << (tokens.bit_length() - 1)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(
            f"logits_chunk must be a positive int (tokens per chunk of the output head) or None "
            f"(automatic), got {chunk!r}."
        )
    return chunk


def vocab_tile(vocab_size: int, chunk: int, dim: int) -> int:
    """Vocabulary rows per tile of the head (`TILE_ELEMENTS`); the whole vocabulary when it is
    smaller."""
    rows = max(TILE_ELEMENTS // max(chunk, dim), 1)
    return min(vocab_size, 1 << (rows.bit_length() - 1))


def head_losses(
    h: Array,
    embedding: Array,
    targets: Array,
    *,
    dtype,
    chunk: int,
    label_smoothing: float = 0.0,
    tile: int | None = None,
) -> tuple[Array, Array]:
    """Next-token losses and hits of the tied head ``logits = h @ embedding^T``.

    Args:
      h: the normalised final stream [N, T, D].
      embedding: the token embedding [vocab, D] (the head's weight).
      targets: int [N, T], the next tokens.
      dtype: the head's compute dtype: ``h`` and each tile of ``embedding`` are cast to it and
        their product is rounded to it, as `flax.nnx.Embed.attend` computes; the logits are
        then float32 (float64 for float64 compute).
      chunk: tokens per chunk; the batch's ``N * T`` tokens are padded to a multiple of it and
        the padding dropped. ``chunk >= N * T``: one chunk.
      label_smoothing: as `cross_entropy`.
      tile: vocabulary rows per tile (default: `vocab_tile`); the last tile ends at the
        vocabulary's end and skips the rows the one before covered.

    Returns:
      ``(losses, correct)``: [N, T] cross-entropies (in the logits' dtype) and 1.0 where the
      logits' argmax (the first, on ties) is the target.
    """
    n, t, d = h.shape
    total = n * t
    vocab = embedding.shape[0]
    dtype = jnp.dtype(dtype)
    chunk = min(chunk, total)
    tile = vocab_tile(vocab, chunk, d) if tile is None else min(tile, vocab)
    count = -(-total // chunk)
    pad = count * chunk - total
    hs = jnp.pad(h.astype(dtype).reshape(total, d), ((0, pad), (0, 0))).reshape(count, chunk, d)
    ys = jnp.pad(targets.reshape(total).astype(jnp.int32), (0, pad)).reshape(count, chunk)
    losses, correct = _head(hs, embedding, ys, (dtype, float(label_smoothing), tile))
    unpad = lambda a: a.reshape(count * chunk)[:total].reshape(n, t)  # noqa: E731
    return unpad(losses), unpad(correct)


def _accumulation(dtype) -> jnp.dtype:
    """The logits' and the gradients' dtype: float64 for float64 compute, else float32."""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype).itemsize > 4 else jnp.float32)


def _loop(count: int, body, carry):
    """``body(k, carry)`` for k = 0 .. count - 1: a call for one, a loop for more."""
    return body(0, carry) if count == 1 else lax.fori_loop(0, count, body, carry)


def _over_chunks(fn, xs: tuple, carry=None):
    """``fn(carry, x) -> (carry, y)`` over the leading axis of ``xs`` (one chunk: no loop)."""
    if xs[0].shape[0] == 1:
        carry, y = fn(carry, tuple(x[0] for x in xs))
        return carry, jax.tree.map(lambda a: a[None], y)
    return lax.scan(fn, carry, xs)


def _tile_logits(h: Array, embedding: Array, k, static) -> tuple:
    """Tile ``k``: ``(first row, its rows in the compute dtype, logits [chunk, tile],
    vocabulary ids [tile], which columns are new [1, tile])``."""
    dtype, _, tile = static
    vocab = embedding.shape[0]
    start = jnp.minimum(k * tile, vocab - tile)  # the last tile ends at the vocabulary's end
    rows = lax.dynamic_slice_in_dim(embedding, start, tile, 0).astype(dtype)
    logits = jnp.dot(h, rows.T).astype(_accumulation(dtype))
    ids = start + jnp.arange(tile, dtype=jnp.int32)
    return start, rows, logits, ids, (ids >= k * tile)[None, :]


def _forward(hs, embedding, ys, static):
    """Losses, hits and log-sum-exps of every chunk."""
    dtype, smoothing, tile = static
    vocab = embedding.shape[0]
    acc = _accumulation(dtype)

    def chunk_fn(_, xs):
        h, y = xs

        def tile_fn(k, carry):  # online softmax: running max, sum, target logit, argmax
            top, total, logit_sum, target_logit, best = carry
            _, _, z, ids, new = _tile_logits(h, embedding, k, static)
            masked = jnp.where(new, z, -jnp.inf)
            tile_top = jnp.max(masked, axis=-1)
            top_new = jnp.maximum(top, tile_top)
            total = total * jnp.exp(top - top_new) + jnp.sum(
                jnp.exp(masked - top_new[:, None]), axis=-1)
            if smoothing:  # the uniform part of the smoothed target needs every logit's sum
                logit_sum = logit_sum + jnp.sum(jnp.where(new, z, 0), axis=-1)
            hit = new & (ids[None, :] == y[:, None])
            target_logit = target_logit + jnp.sum(jnp.where(hit, z, 0), axis=-1)
            best = jnp.where(tile_top > top, ids[jnp.argmax(masked, axis=-1)], best)
            return top_new, total, logit_sum, target_logit, best

        c = h.shape[0]
        zeros = jnp.zeros((c,), acc)
        init = (jnp.full((c,), -jnp.inf, acc), zeros, zeros, zeros, jnp.zeros((c,), jnp.int32))
        top, total, logit_sum, target_logit, best = _loop(-(-vocab // tile), tile_fn, init)
        lse = top + jnp.log(total)
        # -sum_j q_j log softmax_j with q = (1 - a) one_hot + a / vocab (it sums to 1).
        losses = lse - target_logit
        if smoothing:
            losses = lse - (1 - smoothing) * target_logit - smoothing / vocab * logit_sum
        return None, (losses, (best == y).astype(jnp.float32), lse)

    return _over_chunks(chunk_fn, (hs, ys))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head(hs: Array, embedding: Array, ys: Array, static: tuple) -> tuple[Array, Array]:
    """Losses and hits [chunks, chunk] of the chunked stream ``hs`` [chunks, chunk, D] (compute
    dtype) and targets ``ys``; ``static``: (compute dtype, label smoothing, tile rows)."""
    losses, correct, _ = _forward(hs, embedding, ys, static)
    return losses, correct


def _head_fwd(hs, embedding, ys, static):
    losses, correct, lse = _forward(hs, embedding, ys, static)
    return (losses, correct), (hs, embedding, ys, lse)


def _head_bwd(static, residuals, cotangents):
    dtype, smoothing, tile = static
    hs, embedding, ys, lse = residuals
    d_losses = cotangents[0]  # the hits are not differentiable
    vocab = embedding.shape[0]
    acc = _accumulation(dtype)

    def chunk_fn(d_embedding, xs):
        h, y, lse, d_loss = xs

        def tile_fn(k, carry):
            d_embedding, d_h = carry
            start, rows, z, ids, new = _tile_logits(h, embedding, k, static)
            # d loss / d logits = softmax - q, the target distribution of `_forward`.
            target = (ids[None, :] == y[:, None]).astype(acc)
            if smoothing:
                target = (1 - smoothing) * target + smoothing / vocab
            d_z = (jnp.exp(z - lse[:, None]) - target) * d_loss[:, None]
            d_z = jnp.where(new, d_z, 0).astype(dtype)
            d_h = d_h + jnp.dot(d_z, rows, preferred_element_type=acc)
            part = lax.dot_general(d_z, h, (((0,), (0,)), ((), ())), preferred_element_type=acc)
            old = lax.dynamic_slice_in_dim(d_embedding, start, tile, 0)
            d_embedding = lax.dynamic_update_slice_in_dim(
                d_embedding, old + part.astype(d_embedding.dtype), start, 0)
            return d_embedding, d_h

        init = (d_embedding, jnp.zeros(h.shape, acc))
        d_embedding, d_h = _loop(-(-vocab // tile), tile_fn, init)
        return d_embedding, d_h.astype(hs.dtype)

    d_embedding, d_hs = _over_chunks(chunk_fn, (hs, ys, lse, d_losses),
                                     jnp.zeros(embedding.shape, embedding.dtype))
    return d_hs, d_embedding, None


_head.defvjp(_head_fwd, _head_bwd)
