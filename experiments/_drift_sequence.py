"""The drift benchmark's sequence section: conv and transformer F/G, float and fixed-point
carries, bfloat16 compute and bfloat16 halves, side by side.

Each case is one training step of a `revjax.ReversibleSequence` (rolled, ``exact_every=None``):
F = G = conv + BatchNorm + ReLU + conv ("conv", 8x8 maps), or F = LayerNorm + 4-head attention,
G = LayerNorm + exact-GELU MLP ("transformer", 16 tokens); width 32, batch 4, weights at
initialisation. The inputs the backward rebuilt are caught where `sequence_backward` returns
them and compared with the true inputs (float carries: the largest error relative to the
input's largest magnitude; fixed point: elements whose int32 carries differ), beside the
backward's own count of mismatched units (`revjax.rebuild_mismatches`, fixed point) and the
gradients' relative error against plain autodiff of the same model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import _report
from experiments.bench_arithmetic import _branches

WIDTH, BATCH = 32, 4
DEPTHS = (16,)
QUICK_DEPTHS = (2,)
# (compute dtype, halves dtype)
DTYPES = (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"))


def _case(kind: str, compute: str, halves: str, arithmetic: str, n: int) -> dict:
    import revjax
    from revjax import _sequence
    from revjax._carry import quantize

    make_f, make_g = _branches(kind, jnp.dtype(compute), WIDTH)
    seq = revjax.ReversibleSequence(
        make_f, make_g, n, rngs=nnx.Rngs(0), arithmetic=arithmetic, unroll=1
    )
    shape = (BATCH, 8, 8, WIDTH) if kind == "conv" else (BATCH, 16, WIDTH)
    x1 = jax.random.normal(jax.random.key(1), shape).astype(halves)
    x2 = jax.random.normal(jax.random.key(2), shape).astype(halves)
    wrt = nnx.Any(nnx.Param, revjax.RebuildMismatches)

    def grads():
        graphdef, diff, rest = nnx.split(seq, wrt, ...)

        @jax.jit
        def step(diff, rest):
            def loss(diff):
                y1, y2 = nnx.merge(graphdef, diff, rest, copy=True)(x1, x2)
                return jnp.sum(y1.astype(jnp.float32) * jnp.cos(y2.astype(jnp.float32)))

            return jax.grad(loss)(diff)

        with jax.numpy_dtype_promotion("standard"):
            return step(diff, rest)

    caught = []
    original = _sequence.sequence_backward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        jax.debug.callback(lambda a, b: caught.append((np.asarray(a), np.asarray(b))), *out[0])
        return out

    _sequence.sequence_backward = spy
    try:
        rev = grads()
        jax.effects_barrier()
    finally:
        _sequence.sequence_backward = original
    seq.memory_saving = False
    plain = grads()
    params = lambda g: nnx.state(g, nnx.Param)
    rel = float(revjax.relative_error(params(rev), params(plain)))
    ((r1, r2),) = caught
    row = {"kind": kind, "compute": compute, "halves": halves, "arithmetic": arithmetic,
           "units": n, "rel": rel}  # fmt: skip
    if arithmetic == "fixed":
        row["off"] = int(sum(np.count_nonzero(r != np.asarray(quantize(x, 16)))
                             for r, x in ((r1, x1), (r2, x2))))  # fmt: skip
        row["counted"] = sum(revjax.rebuild_mismatches(rev).values())
    else:
        f32 = lambda a: np.asarray(a, np.float32)
        err = max(float(np.max(np.abs(f32(r) - f32(x)))) for r, x in ((r1, x1), (r2, x2)))
        scale = max(float(np.max(np.abs(f32(x)))) for x in (x1, x2))
        row["rebuild"] = err / scale
        row["off"] = int(sum(np.count_nonzero(f32(r) != f32(x)) for r, x in ((r1, x1), (r2, x2))))
    row["total"] = 2 * x1.size
    return row


def measure(quick: bool) -> list[dict]:
    """Every kind x `DTYPES` x depth, float and fixed carries (``quick``: float32 conv and
    bfloat16 transformer, 2 units)."""
    rows = []
    for kind in ("conv", "transformer"):
        quick_dtypes = DTYPES[:1] if kind == "conv" else DTYPES[-1:]
        for compute, halves in quick_dtypes if quick else DTYPES:
            for n in QUICK_DEPTHS if quick else DEPTHS:
                for arithmetic in ("float", "fixed"):
                    rows.append(_case(kind, compute, halves, arithmetic, n))
                    print(f"  sequence drift: {rows[-1]}", flush=True)
    return rows


def markdown(rows: Sequence[dict]) -> str:
    by = {(r["kind"], r["compute"], r["halves"], r["units"], r["arithmetic"]): r for r in rows}
    table = []
    for (kind, compute, halves, n, arithmetic), r in by.items():
        if arithmetic != "float":
            continue
        fx = by.get((kind, compute, halves, n, "fixed"))
        table.append([
            kind, compute, halves, n, f"{r['rebuild']:.1e}", f"{r['off']:,} of {r['total']:,}",
            f"{r['rel']:.1e}",
            "-" if fx is None else f"{fx['off']:,}",
            "-" if fx is None else f"{fx['counted']:g}",
            "-" if fx is None else f"{fx['rel']:.1e}",
        ])  # fmt: skip
    return "\n".join(
        [
            "## Conv and transformer sequences: float vs fixed point, bfloat16 compute and halves",
            "",
            "One training step of a `ReversibleSequence` (rolled, `exact_every=None`, weights at "
            "init, width 32, batch 4): conv = conv + BatchNorm + ReLU + conv on 8x8 maps; "
            "transformer = LayerNorm + 4-head attention / LayerNorm + exact-GELU MLP on 16 "
            "tokens; F/G compute and the halves in the given dtypes. The inputs the real "
            "backward rebuilt, caught where the sequence's backward returns them: float "
            "carries' largest error relative to the input's largest magnitude and elements "
            "that differ; fixed-point carries' elements that differ and the backward's own "
            "count of mismatched units (`revjax.rebuild_mismatches`). `vs plain`: relative "
            "error of the parameter gradients against plain autodiff of the same model (the "
            "rounding of a differently compiled backward, see the exact-arithmetic guide).",
            "",
            _report.markdown_table(
                ["F/G", "compute", "halves", "units", "float: rebuild error",
                 "float: elements off", "float: vs plain", "fixed: elements off",
                 "fixed: units counted", "fixed: vs plain"],
                table,
            ),
            "",
        ]
    )  # fmt: skip
