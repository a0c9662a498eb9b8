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
    returned, (outputs, corrections) = output_residual(arith, (y, -y), (c, -c))
    assert returned[0] is outputs[0] is y and corrections[0].dtype == jnp.int8
    assert int(jnp.sum(corrections[0] != 0)) > 1000  # most of these need the low bits
    restored = output_carries(arith, (outputs, corrections))
    np.testing.assert_array_equal(restored[0], c)
    np.testing.assert_array_equal(restored[1], -c)
    # Float carries are their outputs; bfloat16 halves keep the int32 carries.
    floats = _carry.make_carry("float", 16, jnp.float32)
    assert output_residual(floats, (y, y), (y, y)) == ((y, y), (y, y))
    bf16 = _carry.make_carry("fixed", 16, jnp.bfloat16)
    assert output_residual(bf16, (y, y), (c, c)) == ((y, y), (c, c))


def test_outputs_pass_the_corrections_barrier_on_tpu_only():
    """Traced for a TPU, a fixed-point sequence returns its float outputs from the barrier that
    materialises the int8 corrections (one barrier holds both); for a GPU or the CPU the outputs
    stay outside it. Run here, the TPU trace's values and gradients are the CPU trace's and
    every unit is rebuilt exactly."""
    f = g = lambda p, x: jnp.tanh(x * p)
    params = jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32)
    x = jnp.sin(jnp.arange(16, dtype=jnp.float32)).reshape(2, 8)

    def loss(p, x, probe):
        y1, y2 = revjax.reversible_sequence(
            f, g, p, p, x, -x, arithmetic="fixed", unroll=1, rebuild_probe=probe
        )
        return jnp.sum(jnp.sin(y1) * y2)

    def grad():  # a new function per trace: JAX caches a function's trace (see compiling_for)
        return jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1, 2))

    probe = jnp.zeros((), jnp.float32)

    def output_barriers(platform):
        with revjax.compiling_for(platform):
            text = str(jax.make_jaxpr(grad())(params, x, probe))
        return [line.split("=")[0] for line in text.splitlines()
                if "optimization_barrier" in line and "i8[2,8]" in line.split("=")[0]]

    (tpu,) = output_barriers("tpu")
    assert tpu.count("f32[2,8]") == 2 and tpu.count("i8[2,8]") == 2, tpu
    for platform in ("gpu", "cpu"):
        (other,) = output_barriers(platform)
        assert "f32" not in other, other
    with revjax.compiling_for("tpu"):
        value, (*on_tpu, count) = jax.jit(grad())(params, x, probe)
    expected, (*on_cpu, _) = jax.jit(grad())(params, x, probe)
    assert float(count) == 0.0
    assert float(value) == float(expected)  # the same forward bits
    assert float(revjax.relative_error(on_tpu, on_cpu)) <= 1e-6


def test_isolation_follows_the_platform_compiled_for():
    from revjax import _units

    with revjax.compiling_for("tpu"):
        assert revjax.target_platform() == "tpu" and revjax.default_unroll(7) == 1
        assert not _units.isolation_keeps_pullback()
        with revjax.compiling_for("cuda"):  # nested: the innermost wins; JAX's GPU names
            assert revjax.target_platform() == "gpu"
        assert revjax.target_platform() == "tpu"
    assert revjax.target_platform() == jax.default_backend()
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        with revjax.compiling_for("metal"):
            pass
    # Traced for the CPU, a fixed-point sequence isolates F and G in conditionals (that also
    # yield the pullback's residuals); for a GPU with barriers.
    f = g = lambda p, x: jnp.tanh(x * p)
    params = jnp.ones((3,), jnp.float32)
    x = jnp.linspace(-1, 1, 8, dtype=jnp.float32)

    def loss(p, x):
        y1, y2 = revjax.reversible_sequence(f, g, p, p, x, x, arithmetic="fixed", unroll=1)
        return jnp.sum(y1 * y2)

    def primitives(platform):
        with revjax.compiling_for(platform):
            return str(jax.make_jaxpr(jax.grad(loss))(params, x))

    assert "cond[" in primitives("cpu") and "cond[" not in primitives("gpu")


def test_isolated_evaluations_slice_their_parameters_on_gpu():
    """Traced for a GPU, a fixed-point sequence's isolated F/G evaluations (forward, rebuild)
    take the stacked parameters through their input barrier and slice their unit inside, and
    the pullback's recomputation slices it after the barrier that follows the rebuild: no
    barrier carries a unit's slice. A slice before a barrier is held in the parameters' dtype
    (float32 beside bfloat16 compute) through the isolated evaluation and the pullback (a
    RevGPT's MLP kernels on the H100 target). Run here, every unit is rebuilt exactly and the
    gradients are the CPU trace's."""
    n, width = 3, 4
    params = {"w": jnp.linspace(0.5, 1.5, n * width, dtype=jnp.float32).reshape(n, width)}
    f = g = lambda p, x: jnp.tanh(x * p["w"][None])
    x = jnp.sin(jnp.arange(2 * width, dtype=jnp.float32)).reshape(2, width)

    def loss(p, x, probe):
        y1, y2 = revjax.reversible_sequence(
            f, g, p, p, x, -x, arithmetic="fixed", unroll=1, rebuild_probe=probe
        )
        return jnp.sum(jnp.sin(y1) * y2)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    probe = jnp.zeros((), jnp.float32)
    with revjax.compiling_for("gpu"):
        text = str(jax.make_jaxpr(grad)(params, x, probe))
        *on_gpu, count = jax.jit(grad)(params, x, probe)
    barriers = [line.split("=")[0] for line in text.splitlines() if "optimization_barrier" in line]
    stacked = [b for b in barriers if f"f32[{n},{width}]" in b]
    # Forward: F and G's input barriers; backward: each branch's input barrier and the one
    # after its rebuild.
    assert len(stacked) == 6, barriers
    assert not [b for b in barriers if f"f32[{width}]" in b], barriers
    assert float(count) == 0.0
    *on_cpu, _ = jax.jit(grad)(params, x, probe)
    assert float(revjax.relative_error(on_gpu, on_cpu)) <= 1e-6
