"""The language models' output head and next-token cross-entropy, optionally in chunks.

A tied head maps every position's final stream to float32 logits over the vocabulary: for a
large vocabulary (GPT-2's 50,257) and a long context those logits, their gradient and their
casts are the largest buffers of a training step, and they do not shrink with depth or with
reversibility. `head_losses` evaluates the head and the cross-entropy over chunks of the
batch's tokens inside a `jax.lax.scan` whose body is `jax.checkpoint`-ed, so one chunk's logits
exist at a time in the forward and in the backward (the backward recomputes each chunk's
logits from its slice of the stream); the embedding's gradient is accumulated over the chunks
in float32. Per-token losses are computed by the same operations as without chunks; only the
summation order of the head's weight gradient changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

Array = jax.Array

# The automatic chunk: the largest power of two of tokens whose float32 logits hold at most
# this many elements (64 MiB); a batch with fewer tokens takes one pass without a loop.
AUTO_CHUNK_ELEMENTS = 2**24


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


def head_losses(
    h: Array,
    embedding: Array,
    targets: Array,
    *,
    dtype,
    chunk: int,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array]:
    """Next-token losses and hits of the tied head ``logits = h @ embedding^T``.

    Args:
      h: the normalised final stream [N, T, D].
      embedding: the token embedding [vocab, D] (the head's weight).
      targets: int [N, T], the next tokens.
      dtype: the head's compute dtype (``h`` and ``embedding`` are cast to it, as
        `flax.nnx.Embed.attend` does); the logits are float32 (float64 for float64 compute).
      chunk: tokens per chunk; the batch's ``N * T`` tokens are padded to a multiple of it and
        the padding dropped. ``chunk >= N * T``: one pass, no loop.
      label_smoothing: as `cross_entropy`.

    Returns:
      ``(losses, correct)``: [N, T] cross-entropies (in the logits' dtype) and 1.0 where the
      logits' argmax is the target.
    """

    def piece(h, embedding, targets):
        logits = jnp.dot(h.astype(dtype), embedding.astype(dtype).T)
        logits = logits.astype(jnp.promote_types(dtype, jnp.float32))  # float32 or float64
        losses = cross_entropy(logits, targets, label_smoothing)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return losses, correct

    n, t, d = h.shape
    total = n * t
    if chunk >= total:
        return piece(h, embedding, targets)
    count = -(-total // chunk)
    pad = count * chunk - total
    hs = jnp.pad(h.reshape(total, d), ((0, pad), (0, 0))).reshape(count, chunk, d)
    ys = jnp.pad(targets.reshape(total), (0, pad)).reshape(count, chunk)
    body = jax.checkpoint(piece)  # saves the chunk's inputs; the backward recomputes its logits

    def step(_, xs):
        return None, body(xs[0], embedding, xs[1])

    _, (losses, correct) = lax.scan(step, None, (hs, ys))
    unpad = lambda a: a.reshape(count * chunk)[:total].reshape(n, t)  # noqa: E731
    return unpad(losses), unpad(correct)
