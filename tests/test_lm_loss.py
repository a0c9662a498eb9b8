"""Tests of the language models' chunked head and loss (`token_losses`, ``logits_chunk``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_l2

import revjax
from revjax._lm_loss import head_losses, resolve_chunk, vocab_tile
from revjax.train import cross_entropy

# 2 x 12 = 24 tokens: chunks of 5 leave a padded last chunk, 24 is one pass.
TINY = dict(vocab_size=37, context_length=12, embed_dim=16, depth=2, num_heads=2, unroll=1)


def _batch(seed=0, n=2, t=12, vocab=TINY["vocab_size"]):
    tokens = jax.random.randint(jax.random.key(seed), (n, t + 1), 0, vocab)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model, tokens, targets, chunk, label_smoothing=0.0):
    model.logits_chunk = chunk
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        losses, correct = m.token_losses(tokens, targets, label_smoothing=label_smoothing)
        return jnp.mean(losses), (losses, correct)

    (_, (losses, correct)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return losses, correct, grads




@pytest.mark.parametrize(
    "cls, dtype, tol",
    [
        # float64: the chunks only reorder the sum of the head's weight gradient.
        (revjax.GPT, "float64", 1e-13),
        (revjax.RevGPT, "float64", 1e-13),
        # float32: the same reordering at float32 rounding.
        (revjax.GPT, "float32", 1e-6),
        (revjax.RevGPT, "float32", 1e-6),
    ],
)
def test_chunked_loss_and_gradients_equal_unchunked(cls, dtype, tol):
    """Per-token losses, hits and gradients with chunks of 5 tokens (a padded last chunk) equal
    one pass, which equals the full logits' cross-entropy (float32: label-smoothed)."""
    param = jnp.dtype(dtype)
    smoothing = 0.1 if dtype == "float32" else 0.0
    extra = dict(arithmetic="float") if cls is revjax.RevGPT and dtype == "float64" else {}
    # Flax's norms promote float64 with float32 inside, which strict promotion rejects.
    with jax.enable_x64(dtype == "float64"), jax.numpy_dtype_promotion("standard"):
        model = cls(rngs=nnx.Rngs(0), **TINY, param_dtype=param, **extra)
        tokens, targets = _batch()
        whole = _loss_and_grads(model, tokens, targets, None, smoothing)  # 24 tokens: one pass
        chunked = _loss_and_grads(model, tokens, targets, 5, smoothing)
        logits = nnx.jit(lambda m, t: m(t))(model, tokens)
        direct = cross_entropy(logits, targets, smoothing)
        hits = jnp.argmax(logits, -1) == targets
        assert whole[0].dtype == param and whole[0].shape == tokens.shape
        np.testing.assert_allclose(whole[0], direct, rtol=tol, atol=0)
        np.testing.assert_allclose(chunked[0], whole[0], rtol=tol, atol=0)
        np.testing.assert_array_equal(chunked[1], whole[1])
        np.testing.assert_array_equal(whole[1], hits)
        err = rel_l2(chunked[2], whole[2])
        assert err < tol, err


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_tiled_head_equals_full_logits(dtype, tol):
    """The head over vocabulary tiles (8 rows of 37: the last tile overlaps the one before)
    and chunks of 5 of 24 tokens equals the full logits' cross-entropy under plain autodiff:
    losses, hits, the stream's and the table's gradients, with and without label smoothing.
    Per-token weights make every token's cotangent different."""
    dt = jnp.dtype(dtype)
    with jax.enable_x64(dtype == "float64"):
        k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
        h = jax.random.normal(k1, (2, 12, 16), dt)
        table = jax.random.normal(k2, (37, 16), dt)
        targets = jax.random.randint(k3, (2, 12), 0, 37, jnp.int32)
        weights = jax.random.uniform(k4, (2, 12), dt, 0.5, 1.5)
        for smoothing in (0.0, 0.1):
            def tiled(h, table, smoothing=smoothing):
                losses, hits = head_losses(h, table, targets, dtype=dt, chunk=5,
                                           label_smoothing=smoothing, tile=8)
                return jnp.sum(losses * weights), (losses, hits)

            def full(h, table, smoothing=smoothing):
                logits = jnp.einsum("ntd,vd->ntv", h, table)
                losses = cross_entropy(logits, targets, smoothing)
                hits = (jnp.argmax(logits, -1).astype(jnp.int32) == targets).astype(jnp.float32)
                return jnp.sum(losses * weights), (losses, hits)

            grad = lambda f: jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))  # noqa: E731
            (_, (losses, hits)), grads = grad(tiled)(h, table)
            (_, (losses0, hits0)), grads0 = grad(full)(h, table)
            np.testing.assert_allclose(losses, losses0, rtol=tol, atol=0)
            np.testing.assert_array_equal(hits, hits0)
            for g, g0 in zip(grads, grads0, strict=True):
                assert rel_l2(g, g0) < tol, (smoothing, rel_l2(g, g0))
    assert vocab_tile(50257, 256, 768) == 4096 and vocab_tile(84, 256, 128) == 84


@pytest.mark.parametrize("cls", [revjax.GPT, revjax.RevGPT])
def test_chunked_step_uses_less_memory(cls):
    """The compiled gradient step's temporaries shrink when the logits come in chunks: a
    vocabulary large next to the width, so the logits dominate."""
    opts = dict(vocab_size=2048, context_length=64, embed_dim=16, depth=2, num_heads=2,
                unroll=1)
    model = cls(rngs=nnx.Rngs(0), **opts)
    tokens = jax.ShapeDtypeStruct((4, 64), jnp.int32)  # 256 tokens: 2 MiB of float32 logits
    temps = {}
    for chunk in (256, 32):
        model.logits_chunk = chunk
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, tokens, targets, graphdef=graphdef, rest=rest):
            losses, _ = nnx.merge(graphdef, p, rest, copy=True).token_losses(tokens, targets)
            return jnp.mean(losses)

        compiled = jax.jit(jax.grad(loss)).lower(params, tokens, tokens).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    # One pass (one vocabulary tile) holds a [256, 2048] float32 logits tile (2 MiB) and its
    # softmax pieces; chunks of 32 tokens hold 1/8 of each.
    assert temps[32] < 0.75 * temps[256], temps
    assert temps[256] - temps[32] > 2**20, temps


def test_logits_chunk_checked_and_automatic():
    assert resolve_chunk(None, 65) == 2**17  # small vocabularies: one pass in practice
    assert resolve_chunk(None, 50257) == 256
    assert resolve_chunk(7, 50257) == 7
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="logits_chunk must be a positive int"):
            revjax.GPT(rngs=nnx.Rngs(0), **TINY, logits_chunk=bad)
    model = revjax.GPT(rngs=nnx.Rngs(0), **TINY)
    tokens, targets = _batch()
    with pytest.raises(ValueError, match="must have the tokens' shape"):
        model.token_losses(tokens, targets[:, :5])
