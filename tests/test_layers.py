"""Tests of `revjax.ReversibleSequence`: any NNX F/G, side inputs, state, RNG, memory, errors.

F and G here are transformer-like (LayerNorm + multi-head attention with attention dropout; a
LayerNorm + MLP with dropout and drop-path), both conditioned on a side input that receives
gradients, plus a boolean attention mask that receives none. Every compiled function is built
once per module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import ReversibleSequence
from revjax import relative_error as _relative_error

N, L, D = 2, 6, 8  # batch, tokens, features of each half
UNITS = 3

# Compiled once per tree structure (eagerly, every operation on every leaf shape compiles).
relative_error = jax.jit(_relative_error)


class DropPath(nnx.Module):
    """Drops a whole sample's branch with probability ``rate`` (stochastic depth)."""

    def __init__(self, rate: float, rngs: nnx.Rngs):
        self.rate = rate
        self.rngs = rngs.dropout.fork()

    def __call__(self, x, *, deterministic: bool):
        if deterministic:
            return x
        keep = jax.random.bernoulli(self.rngs(), 1 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / (1 - self.rate), jnp.zeros_like(x))


class Mixer(nnx.Module):
    """F: LayerNorm, plus a projection of the side input, then masked self-attention."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(D, **kw)
        self.cond = nnx.Linear(D, D, **kw)
        self.attn = nnx.MultiHeadAttention(2, D, dropout_rate=0.25, decode=False, **kw)

    def __call__(self, x, cond, mask, *, deterministic: bool):
        h = self.norm(x) + self.cond(cond)[:, None, :]  # [N, L, D]
        return self.attn(h, mask=mask, deterministic=deterministic)


class Mlp(nnx.Module):
    """G: LayerNorm scaled by the side input, MLP with dropout, drop-path."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(D, **kw)
        self.up = nnx.Linear(D, 2 * D, **kw)
        self.down = nnx.Linear(2 * D, D, **kw)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.drop_path = DropPath(0.5, rngs)

    def __call__(self, x, cond, mask, *, deterministic: bool):
        h = self.norm(x) * (1 + cond[:, None, :])
        h = self.drop(jax.nn.gelu(self.up(h)), deterministic=deterministic)  # [N, L, 2D]
        return self.drop_path(self.down(h), deterministic=deterministic)


def _inputs(dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    x1 = jax.random.normal(k1, (N, L, D), dtype)
    x2 = jax.random.normal(k2, (N, L, D), dtype)
    cond = jax.random.normal(k3, (N, D), dtype)
    mask = jnp.tril(jnp.ones((L, L), bool))[None, None]  # [1, 1, L, L], causal
    return x1, x2, cond, mask


def _sequence(dtype, memory_saving, unroll=None):
    return ReversibleSequence(
        functools.partial(Mixer, dtype),
        functools.partial(Mlp, dtype),
        UNITS,
        rngs=nnx.Rngs(0, dropout=1),
        memory_saving=memory_saving,
        unroll=unroll,
    )


def _loss(seq, x1, x2, cond, mask, deterministic=False):
    y1, y2 = seq(x1, x2, cond, mask, deterministic=deterministic)
    return jnp.sum(y1 * jnp.sin(y2))


@nnx.jit
def _outputs(seq, x1, x2, cond, mask):
    return (
        seq(x1, x2, cond, mask, deterministic=False),
        seq(x1, x2, cond, mask, deterministic=True),
    )


def _run(dtype, unroll, outputs=False):
    """Gradients w.r.t. (parameters, x1, x2, cond) in both modes, and what the call changed."""
    x1, x2, cond, mask = _inputs(dtype)
    grad = nnx.jit(nnx.grad(_loss, argnums=(0, 1, 2, 3)))
    out = {}
    for memory_saving in (True, False):
        seq = _sequence(dtype, memory_saving, unroll)
        out[memory_saving] = dict(
            grads=grad(seq, x1, x2, cond, mask),
            counts=jax.tree.leaves(nnx.state(seq, nnx.RngCount)),
        )
        if outputs and memory_saving:
            out[memory_saving]["y"], out[memory_saving]["y_det"] = _outputs(seq, x1, x2, cond, mask)
    return out


@pytest.fixture(scope="module")
def float64_run():
    # Flax's LayerNorm promotes its input with float32 (`promote_types(dtype, float32)`), which
    # strict promotion rejects for float64: standard promotion for this fixture only.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        return _run(jnp.float64, unroll=None, outputs=True)  # default: fully unrolled on CPU


@pytest.fixture(scope="module")
def float32_run():
    return _run(jnp.float32, unroll=1)  # rolled, as on GPU/TPU


def _errors(run):
    rev, plain = run[True]["grads"], run[False]["grads"]
    names = ("params", "x1", "x2", "context")
    return {name: float(relative_error(a, b)) for name, a, b in zip(names, rev, plain)}


def test_gradients_match_plain_float64(float64_run, x64):
    errors = _errors(float64_run)
    # measured ~5e-16 for every group
    assert max(errors.values()) <= 1e-10, errors
    # the side input does receive a gradient, from every unit
    assert float(jnp.abs(float64_run[True]["grads"][3]).max()) > 1e-3


def test_gradients_match_plain_float32(float32_run):
    errors = _errors(float32_run)
    # float32, 3 units of LayerNorm/attention/MLP, rolled scan: measured <= 1e-6; the
    # tolerance leaves room for other CPUs' reduction orders.
    assert max(errors.values()) <= 1e-5, errors


def test_dropout_is_active_and_replayed(float64_run, x64):
    rev = float64_run[True]
    # Dropout changes the output, so equal gradients mean the recomputation drew the same masks.
    y, y_det = rev["y"], rev["y_det"]
    assert float(relative_error(y, y_det)) > 1e-2
    # One grad step advanced every unit's RNG counter once (the recomputation does not count),
    # as plain autodiff does.
    counts = rev["counts"]
    assert len(counts) == 3  # attention dropout, dropout, drop-path
    for count, plain in zip(counts, float64_run[False]["counts"]):
        assert count.tolist() == [1] * UNITS
        assert count.tolist() == plain.tolist()


# --------------------------------------------------------------------------------------------
# BatchNorm: statistics written back once per call
# --------------------------------------------------------------------------------------------


class NormBranch(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(D, D, rngs=rngs)
        self.bn = nnx.BatchNorm(D, momentum=0.9, use_fast_variance=False, rngs=rngs)

    def __call__(self, x, *, train: bool):
        return jax.nn.relu(self.bn(self.linear(x), use_running_average=not train))


def _bn_sequence(memory_saving):
    return ReversibleSequence(
        NormBranch, NormBranch, UNITS, rngs=nnx.Rngs(3), memory_saving=memory_saving
    )


def test_batch_norm_statistics_updated_once():
    x1, x2, _, _ = _inputs(jnp.float32)

    def loss(seq, x1, x2):
        y1, y2 = seq(x1, x2, train=True)
        return jnp.sum(y1 * y2)

    grad = nnx.jit(nnx.grad(loss))
    rev, plain, forward = _bn_sequence(True), _bn_sequence(False), _bn_sequence(True)
    grad(rev, x1, x2)
    grad(plain, x1, x2)
    forward(x1, x2, train=True)  # one plain forward pass, no gradient
    stats = [nnx.state(m, nnx.BatchStat) for m in (rev, plain, forward)]
    assert float(relative_error(stats[0], stats[1])) < 1e-6
    assert float(relative_error(stats[0], stats[2])) < 1e-6
    # One update from zero: mean = (1 - momentum) * batch mean, not momentum-squared terms.
    mean = stats[0]["f"]["bn"]["mean"][...]  # [UNITS, D]
    assert float(jnp.abs(mean).max()) > 1e-3
    # Evaluation mode reads the running averages and changes nothing.
    before = nnx.state(rev, nnx.BatchStat)
    rev(x1, x2, train=False)
    assert float(relative_error(nnx.state(rev, nnx.BatchStat), before)) == 0.0


# --------------------------------------------------------------------------------------------
# Memory: compiled temporary bytes of the gradient, flat in depth
# --------------------------------------------------------------------------------------------

MEM_N, MEM_L, MEM_D = 8, 64, 16


class _MemAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(MEM_D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, MEM_D, decode=False, rngs=rngs)

    def __call__(self, x, bias):
        return self.attn(self.norm(x) + bias[None, None, :])


class _MemMlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(MEM_D, rngs=rngs)
        self.up = nnx.Linear(MEM_D, 4 * MEM_D, rngs=rngs)
        self.down = nnx.Linear(4 * MEM_D, MEM_D, rngs=rngs)

    def __call__(self, x, bias):
        return self.down(jax.nn.gelu(self.up(self.norm(x) + bias[None, None, :])))


def _temp_bytes(units: int, memory_saving: bool) -> int:
    # Shapes only (nothing runs): no initialisation compiled.
    seq = nnx.eval_shape(
        lambda: ReversibleSequence(
            _MemAttention, _MemMlp, units, rngs=nnx.Rngs(0), memory_saving=memory_saving,
            unroll=1,
        )
    )  # fmt: skip
    graphdef, params, rest = nnx.split(seq, nnx.Param, ...)  # rest: the attention's RNG state
    x = jax.ShapeDtypeStruct((MEM_N, MEM_L, MEM_D), jnp.float32)
    bias = jax.ShapeDtypeStruct((MEM_D,), jnp.float32)

    def loss(params, rest, x1, x2, bias):
        y1, y2 = nnx.merge(graphdef, params, rest, copy=True)(x1, x2, bias)
        return jnp.sum(y1 * y2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4)))
    return grad.lower(params, rest, x, x, bias).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_flat_in_depth():
    rev4, rev24 = _temp_bytes(4, True), _temp_bytes(24, True)
    plain4, plain24 = _temp_bytes(4, False), _temp_bytes(24, False)
    assert rev24 <= 1.10 * rev4, (rev4, rev24)
    assert plain24 >= 3 * plain4, (plain4, plain24)  # what the test would catch


# --------------------------------------------------------------------------------------------
# Errors, public name, the RevNet built on it
# --------------------------------------------------------------------------------------------


def test_error_output_does_not_fit_the_halves():
    seq = ReversibleSequence(
        lambda rngs: nnx.Linear(D, D + 2, rngs=rngs),
        lambda rngs: nnx.Linear(D, D, rngs=rngs),
        2,
        rngs=nnx.Rngs(0),
    )
    x = jnp.ones((N, L, D))
    with pytest.raises(ValueError, match=r"F must map its input to the shape of x1"):
        seq(x, x)


@pytest.mark.parametrize("context", ["causal", nnx.Linear(2, 2, rngs=nnx.Rngs(0)), (1.0,)])
def test_error_context_is_not_arrays(context):
    seq = ReversibleSequence(
        lambda rngs: nnx.Linear(D, D, rngs=rngs),
        lambda rngs: nnx.Linear(D, D, rngs=rngs),
        2,
        rngs=nnx.Rngs(0),
    )
    x = jnp.ones((N, L, D))
    with pytest.raises(ValueError, match="context must be a pytree of arrays"):
        seq(x, x, x, context)


def test_error_array_as_keyword_argument():
    seq = ReversibleSequence(
        lambda rngs: nnx.Linear(D, D, rngs=rngs),
        lambda rngs: nnx.Linear(D, D, rngs=rngs),
        2,
        rngs=nnx.Rngs(0),
    )
    x = jnp.ones((N, L, D))
    with pytest.raises(ValueError, match="Pass arrays positionally, as context"):
        seq(x, x, scale=jnp.ones(()))


@pytest.mark.parametrize("num_units", [0, -1, 2.5, True])
def test_error_num_units(num_units):
    make = lambda rngs: nnx.Linear(D, D, rngs=rngs)
    with pytest.raises(ValueError, match="num_units >= 1"):
        ReversibleSequence(make, make, num_units, rngs=nnx.Rngs(0))


class _Normed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(D, D, rngs=rngs)
        self.norm = nnx.BatchNorm(D, use_running_average=False, rngs=rngs)

    def __call__(self, x, scale=1.0):
        return self.norm(self.linear(x)) * scale

    def doubled(self, x):
        return 2 * self(x)


def test_pure_call_matches_the_stateful_call():
    """`revjax.pure_call`: the same output and state update as calling the module, without
    writing into the State it was given (under `jax.jit`, split into several States too)."""
    x = jax.random.normal(jax.random.key(0), (N, D))
    module = _Normed(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(module, nnx.Param, ...)
    before = jax.tree.map(jnp.copy, stats)
    out, new_state = jax.jit(revjax.pure_call(graphdef))((params, stats), x, scale=3.0)
    assert jax.tree.all(jax.tree.map(np.array_equal, stats, before))  # not written into
    expected = module(x, scale=3.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    updated = nnx.state(module, nnx.BatchStat)
    for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(updated), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not jax.tree.all(jax.tree.map(np.array_equal, new_state, before))  # stats moved
    one_state = nnx.split(_Normed(nnx.Rngs(0)))[1]
    doubled, _ = revjax.pure_call(graphdef, "doubled")(one_state, x)
    np.testing.assert_allclose(doubled, 2 * revjax.pure_call(graphdef)(one_state, x)[0])
    halved, _ = revjax.pure_call(graphdef, lambda m, x: m(x) / 2)(one_state, x)
    np.testing.assert_allclose(halved, revjax.pure_call(graphdef)(one_state, x)[0] / 2)


class KeywordOnlyLinear(nnx.Module):
    """A module class in the NNX convention: ``rngs`` keyword-only."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


class NeedsWidth(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(D, width, rngs=rngs)


def test_make_with_keyword_only_rngs():
    seq = ReversibleSequence(KeywordOnlyLinear, KeywordOnlyLinear, 2, rngs=nnx.Rngs(0))
    assert seq.f.linear.kernel.shape == (2, D, D)  # built once per unit, stacked
    x = jnp.ones((N, L, D))
    y1, y2 = seq(x, x)
    assert y1.shape == y2.shape == (N, L, D)


def test_error_make_needs_more_than_rngs():
    make = lambda rngs: nnx.Linear(D, D, rngs=rngs)
    with pytest.raises(TypeError, match=r"make_g=lambda rngs: NeedsWidth\(\.\.\., rngs=rngs\)"):
        ReversibleSequence(make, NeedsWidth, 2, rngs=nnx.Rngs(0))


def test_public_name_and_revnet_uses_it():
    assert "ReversibleSequence" in revjax.__all__
    assert revjax.ReversibleSequence is ReversibleSequence
    model = nnx.eval_shape(
        lambda: revjax.RevNet((3, 1), (8, 8, 16), strides=(1, 2), rngs=nnx.Rngs(0))
    )
    assert isinstance(model.stages[0].reversible, ReversibleSequence)
    assert model.stages[0].reversible.num_units == 2
    assert model.stages[1].reversible is None  # a one-unit stage: the entry unit only
