"""Tests of `revjax._chain.reversible_chain`: invertible segments joined into one custom VJP."""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

import revjax
from revjax import relative_error
from revjax._blocks import InvertibleShortcut
from revjax._carry import FloatCarry
from revjax._chain import (
    chain_exact_units,
    reversible_chain,
    sequence_segment,
    shortcut_unit_segment,
)

BATCH, HW, C = 2, 8, 2  # halves [2, 8, 8, 2]; after the stride-2 entry [2, 4, 4, 8]


def conv(w, x, stride=1):
    return lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def residual(p, x):
    return conv(p["w2"], jnp.tanh(conv(p["w1"], x)))


def strided(p, x):
    """The entry's F: stride 2, C -> 4C channels (the shape of the shortcut's output)."""
    return conv(p["w2"], jnp.tanh(conv(p["w1"], x, 2)))


def _weights(key, shape_in, shape_out, n=None, dtype=jnp.float64):
    lead = () if n is None else (n,)
    k1, k2 = jax.random.split(key)
    return {
        "w1": 0.3 * jax.random.normal(k1, (*lead, 3, 3, *shape_in), dtype),
        "w2": 0.3 * jax.random.normal(k2, (*lead, 3, 3, *shape_out), dtype),
    }


def _chain(n_first=3, n_last=2, dtype=jnp.float64):
    """seq(n_first units, C) -> entry (space-to-depth by 2, C -> 4C) -> seq(n_last, 4C)."""
    shortcut = InvertibleShortcut(C, 4 * C, stride=2)
    segments = [
        sequence_segment(residual, residual, n_first),
        shortcut_unit_segment(strided, residual, shortcut, shortcut.inverse),
        sequence_segment(residual, residual, n_last),
    ]
    ks = jax.random.split(jax.random.key(0), 8)
    params = [
        (_weights(ks[0], (C, C), (C, C), n_first, dtype),) * 2,
        (
            _weights(ks[1], (C, C), (C, 4 * C), dtype=dtype),
            _weights(ks[2], (4 * C, 4 * C), (4 * C, 4 * C), dtype=dtype),
        ),
        (
            _weights(ks[3], (4 * C, 4 * C), (4 * C, 4 * C), n_last, dtype),
            _weights(ks[4], (4 * C, 4 * C), (4 * C, 4 * C), n_last, dtype),
        ),
    ]
    x1 = jax.random.normal(ks[5], (BATCH, HW, HW, C), dtype)
    x2 = jax.random.normal(ks[6], (BATCH, HW, HW, C), dtype)
    return segments, params, x1, x2


def _loss(segments, **kw):
    def loss(params, x1, x2):
        (y1, y2), _ = reversible_chain(segments, params, x1, x2, **kw)
        return jnp.sum(jnp.sin(y1) * y2)

    return loss


@pytest.mark.parametrize("exact_every", [None, 1, 2])
def test_chain_gradients_match_plain_float64(exact_every, x64):
    segments, params, x1, x2 = _chain()
    grad = lambda **kw: jax.jit(jax.value_and_grad(_loss(segments, **kw), argnums=(0, 1, 2)))
    v1, g1 = grad(exact_every=exact_every)(params, x1, x2)
    v2, g2 = grad(memory_saving=False)(params, x1, x2)
    assert abs(float(v1 - v2)) <= 1e-12
    assert float(relative_error(g1, g2)) <= 1e-11  # rebuilt across the entry unit


def test_chain_forward_equals_segments_in_turn():
    segments, params, x1, x2 = _chain(dtype=jnp.float32)
    (y1, y2), aux = reversible_chain(segments, params, x1, x2)
    a1, a2 = x1, x2
    for seg, p in zip(segments, params, strict=True):
        (a1, a2), _, _, _ = seg.forward(p, a1, a2, None, None, FloatCarry(a1.dtype))
    assert float(relative_error((y1, y2), (a1, a2))) == 0.0
    assert len(aux) == 3


def test_chain_exact_units_placement():
    # RevNet-164 with invertible downsampling: three stages of (entry, 8 reversible units),
    # 27 units, k = 8 -> the inputs of units 19, 11 and 3 are stored, wherever they fall.
    seg = lambda n: sequence_segment(residual, residual, n)
    entry = shortcut_unit_segment(residual, residual, lambda x: x, lambda x: x)
    stages = [entry, seg(8)] * 3
    assert chain_exact_units(stages, 8) == [None, (2, 1), None, (1, 1), None, (0, 1)]
    assert chain_exact_units(stages, None) == [None] * 6
    assert chain_exact_units([seg(3), entry, seg(2)], 1) == [(1, 2), (0, 1), (0, 2)]
    assert chain_exact_units([seg(3), entry, seg(2)], 2) == [(2, 1), None, (0, 1)]  # 2, 4


def _saved_activation_shapes(exact_every):
    segments, params, x1, x2 = _chain(n_first=4, n_last=4, dtype=jnp.float32)
    kw = {"exact_every": exact_every}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # A linear loss, which itself saves nothing.
        print_saved_residuals(
            lambda *a: sum(jnp.sum(y) for y in reversible_chain(segments, *a, **kw)[0]),
            params,
            x1,
            x2,
        )
    shapes = [
        tuple(int(d) for d in m.group(1).split(",") if d)
        for m in re.finditer(r"^\w+\[([\d,]*)\]", out.getvalue(), flags=re.M)
    ]
    # Activations: [2, 8, 8, 2] / [2, 4, 4, 8] halves, alone or stacked ([k, ...]).
    return [s for s in shapes if s[-4:] in ((BATCH, HW, HW, C), (BATCH, 4, 4, 4 * C))]


def test_chain_stores_only_its_output():
    # Without exact_every: the chain's output halves, and not one activation of the first
    # sequence or of the entry unit (a `reversible_sequence` per piece would store each output).
    saved = _saved_activation_shapes(None)
    assert sorted(saved) == [(BATCH, 4, 4, 4 * C)] * 2, saved
    # exact_every=3 over the 9 units: the inputs of units 6 and 3, one in each sequence.
    saved = _saved_activation_shapes(3)
    assert sorted(saved) == sorted(
        [(BATCH, 4, 4, 4 * C)] * 2 + [(1, BATCH, 4, 4, 4 * C)] * 2 + [(1, BATCH, HW, HW, C)] * 2
    ), saved


def _temp_bytes(num_segments):
    w = jax.ShapeDtypeStruct((2, 3, 3, 16, 16), jnp.float32)
    p = {"w1": w, "w2": w}
    x = jax.ShapeDtypeStruct((8, 16, 16, 16), jnp.float32)
    segments = [sequence_segment(residual, residual, 2, unroll=1)] * num_segments

    def loss(params, x1, x2):
        (y1, y2), _ = reversible_chain(segments, params, x1, x2)
        return jnp.sum(y1 * y2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = grad.lower([(p, p)] * num_segments, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chain_memory_flat_in_segments():
    one, six = _temp_bytes(1), _temp_bytes(6)
    act = 8 * 16 * 16 * 16 * 4  # one half
    # Six separate sequences would store five more outputs (10 halves); the chain stores none.
    assert six - one < 2 * act, (one, six)


def test_entry_unit_backward_orders_g_before_f():
    """The entry unit's backward puts a barrier between G's pullback and F's recomputation
    (without it XLA:GPU overlaps the two branches: +30 MiB of 256 on the H100 target, see
    `shortcut_unit_segment`): one barrier, carrying F's input and y1's cotangent only."""
    segments, params, x1, x2 = _chain(n_first=1, n_last=1, dtype=jnp.float32)
    text = str(jax.make_jaxpr(jax.grad(_loss(segments), argnums=(0, 1, 2)))(params, x1, x2))
    barriers = [line for line in text.splitlines() if "optimization_barrier" in line]
    assert len(barriers) == 1, barriers
    # x2 [2, 8, 8, 2], dy1 [2, 4, 4, 8]
    shapes = re.findall(r"f32\[([\d,]+)\]", barriers[0].split("=")[0])
    assert shapes == ["2,8,8,2", "2,4,4,8"], barriers


def test_entry_unit_rebuild_precedes_its_pullback_on_gpu():
    """Traced for a GPU, the fixed-point entry unit's backward rounds each branch's isolated
    rebuild, then (after a barrier over the rounded output, the branch's parameters and its
    input carry) recomputes the branch for the pullback, as a sequence unit does: left free,
    XLA:GPU held both evaluations' intermediates at once (RevNet-164 with invertible
    downsampling on the H100 target). Run here, it rebuilds every unit exactly and its
    gradients are the CPU trace's."""
    segments, params, x1, x2 = _chain(n_first=1, n_last=1, dtype=jnp.float32)

    def loss(params, x1, x2, probes):
        (y1, y2), _ = reversible_chain(
            segments, params, x1, x2, arithmetic="fixed", rebuild_probes=probes
        )
        return jnp.sum(jnp.sin(y1) * y2)

    probes = [jnp.zeros((), jnp.float32)] * len(segments)
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    with revjax.compiling_for("gpu"):
        text = str(jax.make_jaxpr(grad)(params, x1, x2, probes))
        *on_gpu, counts = jax.jit(grad)(params, x1, x2, probes)
    barriers = [line.split("=")[0] for line in text.splitlines() if "optimization_barrier" in line]
    # F's: q(F(x2)) [2, 4, 4, 8] int32, F's two kernels, the carry x2 [2, 8, 8, 2] int32.
    f_rebuild = "i32[2,4,4,8] f32[3,3,2,2] f32[3,3,2,8] i32[2,8,8,2]"
    assert [b for b in barriers if re.sub(r"\w+:", "", b).split() == f_rebuild.split()], barriers
    assert [float(c) for c in counts] == [0.0] * len(segments)
    *on_cpu, _ = jax.jit(grad)(params, x1, x2, probes)
    assert float(relative_error(on_gpu, on_cpu)) <= 1e-6


def test_chain_errors():
    segments, params, x1, x2 = _chain(dtype=jnp.float32)
    with pytest.raises(ValueError, match="one parameter pytree per segment"):
        reversible_chain(segments, params[:2], x1, x2)
    with pytest.raises(ValueError, match="exact_every must be a positive int"):
        reversible_chain(segments, params, x1, x2, exact_every=0)
