"""Fixed-point rebuild exactness cases, shared by the suite and a subprocess.

`tests/test_fixed_point.py` runs `CASES` under the suite's XLA flags (backend optimisation
level 0), and some of them again compiled with XLA's default debug options (``compiler_options``
of `run_case`). Run as a script in a process of its own, under XLA's defaults,
``python tests/rebuild_cases.py [JSON list of cases]`` prints, per case, the rebuilt carry
elements that differ from the forward's and the backward's own count of mismatched units, as
JSON.

Each case is a `revjax.ReversibleSequence` with ``arithmetic="fixed"`` (the default
``rebuild="isolated"``): F/G = conv + BatchNorm + ReLU + dropout + conv ("conv"), or F = LayerNorm
+ multi-head attention with dropout, G = LayerNorm + exact-GELU MLP with dropout
("transformer"); compute in float32 or bfloat16; halves in float32 or bfloat16; rolled or
unrolled.
"""

from __future__ import annotations

import functools
import json
import os
import sys

if __name__ == "__main__":  # before JAX starts: XLA's defaults, one device
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import revjax
from revjax import _sequence
from revjax._carry import quantize

B, HW, C = 2, 4, 4
ROLLED, UNROLLED = 6, 2  # units: a rolled scan, a fully unrolled one

# (kind, compute dtype, halves dtype, unroll)
CASES = [
    ("conv", "float32", "float32", 1),
    ("conv", "bfloat16", "float32", 1),
    ("conv", "float32", "float32", UNROLLED),
    ("conv", "bfloat16", "bfloat16", 1),
    ("transformer", "float32", "float32", 1),
    ("transformer", "float32", "float32", UNROLLED),
    ("transformer", "bfloat16", "float32", 1),
    ("transformer", "bfloat16", "float32", UNROLLED),
    ("transformer", "float32", "bfloat16", UNROLLED),
    ("transformer", "bfloat16", "bfloat16", 1),
]


def case_id(kind: str, compute: str, halves: str, unroll: int) -> str:
    shape = "unrolled" if unroll > 1 else "rolled"
    return f"{kind}-{compute}-{halves}_halves-{shape}"


class ConvBranch(nnx.Module):
    """conv -> BatchNorm (batch statistics in training) -> ReLU -> dropout -> conv."""

    def __init__(self, compute, rngs):
        kw = dict(dtype=compute, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = nnx.Conv(C, C, (3, 3), use_bias=False, **kw)
        self.bn = nnx.BatchNorm(C, use_fast_variance=False, epsilon=1e-3, **kw)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.conv2 = nnx.Conv(C, C, (3, 3), use_bias=False, **kw)

    def __call__(self, x, *, train):
        h = jax.nn.relu(self.bn(self.conv1(x), use_running_average=not train))
        return self.conv2(self.drop(h, deterministic=not train)).astype(x.dtype)


class AttentionBranch(nnx.Module):
    """LayerNorm -> multi-head self-attention with attention dropout."""

    def __init__(self, compute, rngs):
        kw = dict(dtype=compute, param_dtype=jnp.float32, rngs=rngs)
        self.norm = nnx.LayerNorm(C, **kw)
        self.attn = nnx.MultiHeadAttention(2, C, dropout_rate=0.25, decode=False, **kw)

    def __call__(self, x, *, train):
        return self.attn(self.norm(x), deterministic=not train).astype(x.dtype)


class MlpBranch(nnx.Module):
    """LayerNorm -> MLP (exact GELU) with dropout."""

    def __init__(self, compute, rngs):
        kw = dict(dtype=compute, param_dtype=jnp.float32, rngs=rngs)
        self.norm = nnx.LayerNorm(C, **kw)
        self.up = nnx.Linear(C, 2 * C, **kw)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.down = nnx.Linear(2 * C, C, **kw)

    def __call__(self, x, *, train):
        h = jax.nn.gelu(self.up(self.norm(x)), approximate=False)
        return self.down(self.drop(h, deterministic=not train)).astype(x.dtype)


def build(kind, compute, unroll, **kw):
    """A fixed-point ReversibleSequence of ``ROLLED`` units rolled, or ``unroll`` unrolled."""
    compute = jnp.dtype(compute)
    n = ROLLED if unroll == 1 else unroll
    make_f, make_g = (ConvBranch, ConvBranch) if kind == "conv" else (AttentionBranch, MlpBranch)
    return revjax.ReversibleSequence(
        lambda r: make_f(compute, r), lambda r: make_g(compute, r), n,
        rngs=nnx.Rngs(0, dropout=1), arithmetic="fixed", unroll=unroll, **kw,
    )  # fmt: skip


def halves(kind, dtype):
    shape = (B, HW, HW, C) if kind == "conv" else (B, HW * HW, C)
    x1 = jax.random.normal(jax.random.key(2), shape).astype(dtype)
    x2 = jax.random.normal(jax.random.key(3), shape).astype(dtype)
    return x1, x2


def train_step(seq, x1, x2, compiler_options=None):
    """One jitted value-and-grad of the sequence, differentiating its `RebuildMismatches` too.

    ``compiler_options`` (XLA debug options by name) go to this step's compile only.

    Returns:
      ``(loss, grads, new_state)``; ``grads`` is a State with the parameters' gradients and
      the step's rebuild mismatch count.
    """
    wrt = nnx.Any(nnx.Param, revjax.RebuildMismatches)
    graphdef, diff, rest = nnx.split(seq, wrt, ...)

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(diff, rest, x1, x2):
        def loss(diff):
            m = nnx.merge(graphdef, diff, rest, copy=True)
            y1, y2 = m(x1, x2, train=True)
            w = jnp.cos(jnp.arange(y1.size, dtype=jnp.float32)).reshape(y1.shape)
            value = jnp.sum(y1.astype(jnp.float32) * w) + jnp.sum(jnp.sin(y2.astype(jnp.float32)))
            return value, nnx.state(m, nnx.Not(wrt))

        return jax.value_and_grad(loss, has_aux=True)(diff)

    # Flax's layers promote bfloat16 with float32 inside, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        (value, new_state), grads = step(diff, rest, x1, x2)
    return value, grads, new_state


@jax.custom_jvp
def nudged(x):
    """The identity, whose differentiated evaluation is three grid steps higher."""
    return x


@nudged.defjvp
def _nudged_jvp(primals, tangents):
    return primals[0] + 3 * 2.0**-16, tangents[0]


def run_case(kind, compute, halves_dtype, unroll, compiler_options=None, **kw):
    """Returns ``(elements off, units counted, grads, new_state)`` of one case's train step,
    compiled with ``compiler_options`` (see `train_step`)."""
    got = []
    original = _sequence.sequence_backward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        record = lambda a, b: got.append((np.asarray(a), np.asarray(b)))
        jax.debug.callback(record, *out[0])
        return out

    _sequence.sequence_backward = spy
    try:
        seq = build(kind, compute, unroll, **kw)
        x1, x2 = halves(kind, jnp.dtype(halves_dtype))
        _, grads, state = train_step(seq, x1, x2, compiler_options)
        jax.effects_barrier()
    finally:
        _sequence.sequence_backward = original
    ((r1, r2),) = got
    off = np.count_nonzero(r1 != quantize(x1, 16)) + np.count_nonzero(r2 != quantize(x2, 16))
    counted = sum(revjax.rebuild_mismatches(grads).values())
    return int(off), counted, grads, state


if __name__ == "__main__":
    cases = [tuple(c) for c in json.loads(sys.argv[1])] if len(sys.argv) > 1 else CASES
    out = {case_id(*case): run_case(*case)[:2] for case in cases}
    print(json.dumps(out))
