"""What a RevNet stage keeps for its backward: the entry unit's staged recomputation and the
fixed-point sequence's output residual (float outputs plus an int8 correction)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import _carry
from revjax._blocks import LayerConfig
from revjax._carry import output_carries, output_residual
from revjax._stages import InvertibleRevStage
from revjax.layers import pure_call

N, HW = 2, 8  # batch and side of the stage inputs


def _invertible_stage(dtype):
    config = LayerConfig(dtype=dtype, param_dtype=dtype)
    # Halves 4 -> 16 channels (space-to-depth by 2, no zero padding), then one reversible unit.
    return InvertibleRevStage(
        "basic", 2, 4, 16, mid_features=8, stride=2, first=False, config=config, rngs=nnx.Rngs(0)
    )


def _stage_grads(stage, dtype, **call):
    """Loss value, gradients (parameters and both input halves) and new batch statistics."""
    graphdef, params, rest = nnx.split(stage, nnx.Param, ...)
    run = pure_call(graphdef)
    k1, k2 = jax.random.split(jax.random.key(1))
    x1 = jax.random.normal(k1, (N, HW, HW, 4), dtype)
    x2 = jax.random.normal(k2, (N, HW, HW, 4), dtype)

    def loss(p, x1, x2):
        (y1, y2), new = run((p, rest), x1, x2, train=True, **call)
        w = jnp.cos(jnp.arange(y1.size, dtype=y1.dtype)).reshape(y1.shape)
        return jnp.sum(y1 * w) + jnp.sum(jnp.sin(y2)), new

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(grad)(params, x1, x2)


def test_invertible_stage_entry_recomputation_gradients_float64():
    # The entry unit's staged backward (one branch at a time, shortcuts last) against plain
    # autodiff of the same stage and weights, for an invertible stage called on its own (the
    # RevNet runs those through one chain). The pooled entry units, basic and bottleneck, are
    # checked the same way through the whole RevNet in test_models.py.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        stage = _invertible_stage(jnp.float64)
        saving, plain = {"memory_saving": True}, {"memory_saving": False}
        (v1, s1), g1 = _stage_grads(stage, jnp.float64, **saving)
        (v2, s2), g2 = _stage_grads(stage, jnp.float64, **plain)
        assert jax.tree.leaves(g1)[0].dtype == jnp.float64
        assert float(abs(v1 - v2)) <= 1e-12 * float(abs(v2))
        assert float(revjax.relative_error(g1, g2)) <= 1e-10  # measured ~1e-16
        # Batch statistics written once, from the forward pass: bit for bit plain autodiff's.
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
            np.testing.assert_array_equal(a, b)


def test_output_residual_restores_carries_bit_for_bit():
    arith = _carry.make_carry("fixed", 16, jnp.float32)
    limit = 2**31 - 2**7  # float32(c) stays an int32 below this
    c = jax.random.randint(jax.random.key(0), (4096,), -limit, limit, jnp.int32)
    c = jnp.concatenate([c, jnp.array([0, 1, -1, 2**24 + 1, -(2**24) - 1, limit], jnp.int32)])
    y = arith.leave(c)
    outputs, corrections = output_residual(arith, (y, -y), (c, -c))
    assert outputs[0] is y and corrections[0].dtype == jnp.int8
    assert int(jnp.sum(corrections[0] != 0)) > 1000  # most of these need the low bits
    restored = output_carries(arith, (outputs, corrections))
    np.testing.assert_array_equal(restored[0], c)
    np.testing.assert_array_equal(restored[1], -c)
    # Float carries are their outputs; bfloat16 halves keep the int32 carries.
    floats = _carry.make_carry("float", 16, jnp.float32)
    assert output_residual(floats, (y, y), (y, y)) == (y, y)
    bf16 = _carry.make_carry("fixed", 16, jnp.bfloat16)
    assert output_residual(bf16, (y, y), (c, c)) == (c, c)


def test_residual_layout_follows_the_platform_compiled_for():
    arith = _carry.make_carry("fixed", 16, jnp.float32)
    c = jnp.arange(-5, 5, dtype=jnp.int32) * 3
    y = arith.leave(c)
    with revjax.compiling_for("tpu"):
        assert revjax.target_platform() == "tpu" and revjax.default_unroll(7) == 1
        assert output_residual(arith, (y, y), (c, c)) == (c, c)
        assert output_carries(arith, (c, c)) == (c, c)
        with revjax.compiling_for("cuda"):  # nested: the innermost wins; JAX's GPU names
            assert revjax.target_platform() == "gpu"
            outputs, corrections = output_residual(arith, (y, y), (c, c))
            assert corrections[0].dtype == jnp.int8
        assert revjax.target_platform() == "tpu"
    assert revjax.target_platform() == jax.default_backend()
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        with revjax.compiling_for("metal"):
            pass
    # A fixed-point sequence traced for the TPU keeps its int32 output carries (and nothing
    # else of its output) for the backward.
    f = g = lambda p, x: jnp.tanh(x * p)
    params = jnp.ones((3,), jnp.float32)
    x = jnp.linspace(-1, 1, 8, dtype=jnp.float32)

    def loss(p, x):
        y1, y2 = revjax.reversible_sequence(f, g, p, p, x, x, arithmetic="fixed", unroll=1)
        return jnp.sum(y1 * y2)

    def saved_dtypes(platform):
        with revjax.compiling_for(platform):
            jaxpr = jax.make_jaxpr(lambda p, x: jax.vjp(loss, p, x)[1])(params, x)
        return sorted(str(v.aval.dtype) for v in jaxpr.jaxpr.outvars)

    assert "int8" not in saved_dtypes("tpu") and "int8" in saved_dtypes("gpu")


def test_fixed_gradients_match_plain_beyond_float32_precision():
    # Carries of magnitude ~1000 (beyond 256, where float32 holds fewer bits than the grid):
    # the backward rebuilds from the float outputs plus the int8 corrections, and must still
    # start from the forward's exact carries.
    n = 3
    k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
    fp = 0.3 * jax.random.normal(k1, (n, 4, 4))
    gp = 0.3 * jax.random.normal(k2, (n, 4, 4))
    x1 = 1000.0 * jax.random.normal(k3, (8, 4))
    x2 = 1000.0 * jax.random.normal(k4, (8, 4))
    branch = lambda p, x: jnp.tanh(x / 1000.0) @ p * 7.0

    def loss(memory_saving, fp, gp, x1, x2):
        y1, y2 = revjax.reversible_sequence(
            branch, branch, fp, gp, x1, x2, arithmetic="fixed", memory_saving=memory_saving
        )
        return jnp.sum(jnp.sin(y1)) + jnp.sum(jnp.cos(y2))

    grads = [
        jax.jit(jax.value_and_grad(lambda *a, m=m: loss(m, *a), argnums=(0, 1, 2, 3)))(
            fp, gp, x1, x2
        )
        for m in (True, False)
    ]
    (v1, g1), (v2, g2) = grads
    assert float(jnp.max(jnp.abs(x1))) > 256.0
    assert float(v1) == float(v2)
    assert float(revjax.relative_error(g1, g2)) <= 1e-6
