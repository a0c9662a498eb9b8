"""Step time and carry range of fixed-point against floating-point reversible arithmetic.

For each RevNet preset, runs the trainer's full train step (forward, rebuilding backward, SGD
update) with

- ``float, k=None``: floating-point carries, nothing stored,
- ``fixed, k=None``: int32 fixed-point carries (16 fraction bits), nothing stored, the default
  ``rebuild="isolated"`` (the rebuild evaluates F and G as the forward did; on CPU that
  evaluation also gives the pullback's residuals),
- ``fixed, pullback``: the same with ``rebuild="pullback"`` (the rebuild reuses the pullback's
  recomputation; exact only where XLA compiles it as in the forward),

and reports the median step time and process CPU time, the samples interleaved (round-robin)
so the ratios are measured side by side under the same load. Also reports the largest
fixed-point carry magnitude after the timed steps (`revjax.CarryPeak`), against
`revjax.carry_limit`.

``--range``: the largest carry magnitude of every reversible preset (both downsampling modes
for the RevNets) after init, one forward in train mode on standard-normal images at the
preset's native size and at 224x224. ``--digits``: the offline digits job
(`experiments.configs.digits`) trained with each arithmetic: test accuracy, final loss, and
the largest carry magnitude reached during training. ``--exactness``: on the current backend
(the GPU check runs it), whether the fixed-point backward rebuilds bit for bit: rebuilt
elements whose bits differ from the forward's (`revjax.reconstruction_error`), and the
gradients with nothing stored (``exact_every=None``) against those with every unit's input
stored (``exact_every=1``), which agree bit for bit exactly when the rebuild is exact.

    python -m experiments.bench_arithmetic                    # revnet_tiny, revnet38, revvit_cifar
    python -m experiments.bench_arithmetic --models revnet110 --batch 16
    python -m experiments.bench_arithmetic --range --digits   # add the range and digits tables
    python -m experiments.bench_arithmetic --quick            # seconds, for CI

Writes ``<out-dir>/bench_arithmetic.md``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from experiments import _report
from revjax import CarryPeak, ReversibleSequence, carry_limit, train
from revjax.measure import time_interleaved

NAME = "bench_arithmetic"
MODULE = f"experiments.{NAME}"

VARIANTS = {
    "float, k=None": {"arithmetic": "float", "exact_every": None},
    "fixed, k=None": {"arithmetic": "fixed", "exact_every": None},
    "fixed, pullback": {"arithmetic": "fixed", "exact_every": None, "rebuild": "pullback"},
}
FRAC_BITS = 16


def _peak(state) -> float:
    """Largest `CarryPeak` in a train state's non-parameter variables."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    peaks = [
        float(np.asarray(leaf.get_value()))
        for leaf in jax.tree.leaves(state.batch_stats, is_leaf=is_var)
        if isinstance(leaf, CarryPeak)
    ]
    return max(peaks, default=float("nan"))


def cpu_interleaved(fns: dict, *, repeats: int) -> dict[str, float]:
    """Median process CPU time (all threads, user + system) of each function per call, sampled
    round-robin: the work a step does, which other processes on a shared host change less than
    its wall time."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            start = time.process_time()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.process_time() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def with_rebuild(model: str, overrides: dict, channels: int, rebuild: str):
    """The trainer's step of ``model`` with every `ReversibleSequence` set to ``rebuild``."""
    cfg = train.TrainConfig(model=model, model_overrides=dict(overrides))
    graphdef, state, tx = train.create_train_state(cfg, 10, channels)
    module = nnx.merge(graphdef, state.params, state.batch_stats)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, ReversibleSequence):
            node.rebuild = rebuild
    graphdef = nnx.split(module, nnx.Param, ...)[0]
    return jax.jit(train.make_train_step(graphdef, tx))


def measure(model: str, overrides: dict, *, batch: int, size: int, channels: int, repeats: int):
    fns = {}
    for name, variant in VARIANTS.items():
        variant = dict(variant)
        rebuild = variant.pop("rebuild", None)
        step, state, data = _report.concrete_train_step(
            model, {**overrides, **variant}, batch_size=batch, image_size=size,
            in_channels=channels,
        )  # fmt: skip
        if rebuild is not None:
            step = with_rebuild(model, {**overrides, **variant}, channels, rebuild)
        fns[name] = (step, (state, data))
    times = time_interleaved(fns, warmup=2, repeats=repeats)
    cpu = cpu_interleaved(fns, repeats=repeats)
    step, (state, data) = fns["fixed, k=None"]
    for _ in range(3):
        state, _ = step(state, data)
    row = {"model": model, **{f"time {n}": times[n]["median"] for n in VARIANTS}}
    row.update({f"cpu {n}": cpu[n] for n in VARIANTS})
    row["peak"] = _peak(state)
    print(f"  {model}: {row}", flush=True)
    return row


RANGE_PRESETS = {
    "revnet38": 32, "revnet110": 32, "revnet164": 32, "revnet56": 224, "revnet104": 224,
    "revvit_cifar": 32, "revvit_ti16": 224, "revvit_s16": 224,
}  # fmt: skip


def preset_peaks(name: str, size: int, *, batch: int = 2, **overrides) -> float:
    """Largest carry magnitude of a fixed-point preset after init: one forward in train mode."""
    import revjax

    vit = name.startswith("revvit")
    if vit:
        overrides.setdefault("image_size", size)
    model = getattr(revjax, name)(
        rngs=nnx.Rngs(0), arithmetic="fixed", frac_bits=FRAC_BITS, unroll=1, **overrides
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params, rest, x):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m(x, train=True)
        return [a.get_value() for a in jax.tree.leaves(nnx.state(m, CarryPeak), is_leaf=_is_var)]

    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    return max(float(np.asarray(p)) for p in forward(params, rest, x))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def measure_range(quick: bool) -> list[dict]:
    rows = []
    presets = {"revnet_tiny": 8} if quick else RANGE_PRESETS
    for name, native in presets.items():
        sizes = sorted({native, 224}) if not quick else [native]
        modes = ["pool", "invertible"] if name.startswith("revnet") else [None]
        for mode in modes:
            for size in sizes:
                kw = {} if mode is None else {"downsample": mode}
                peak = preset_peaks(name, size, **kw)
                rows.append({"model": name, "downsample": mode or "-", "size": size, "peak": peak})
                print(f"  {rows[-1]}", flush=True)
    return rows


def run_folder(workdir: Path, arithmetic: str) -> Path:
    """A new folder under ``workdir`` for one digits run: each run trains from the first step
    (a folder holding an earlier run's checkpoint would resume it and measure nothing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{arithmetic}-", dir=workdir))


def measure_digits(quick: bool, workdir: Path) -> list[dict]:
    import dataclasses

    from experiments.configs import digits
    from revjax import train

    rows = []
    for arithmetic in ("float", "fixed"):
        cfg = dataclasses.replace(
            digits.get_config(quick=quick), arithmetic=arithmetic, memory_report=False,
            checkpoint_every=0,
        )  # fmt: skip
        result_state, result = train.train_and_evaluate(cfg, run_folder(workdir, arithmetic))
        rows.append(
            {
                "arithmetic": arithmetic,
                "model": cfg.model,
                "steps": cfg.num_steps,
                "accuracy": result["eval_accuracy"],
                "loss": result["train_loss"],
                "peak": _peak(result_state),
            }
        )
        print(f"  digits: {rows[-1]}", flush=True)
    return rows


_BF16 = {"dtype": "bfloat16", "carry_dtype": "float32"}
#: ``--exactness-models`` names: (preset, constructor overrides).
EXACTNESS_MODELS = {
    "revnet38": ("revnet38", {}),
    "revnet164": ("revnet164", {}),
    "revnet164-invertible": ("revnet164", {"downsample": "invertible"}),
    "revnet164-bf16": ("revnet164", _BF16),
    "revvit_cifar": ("revvit_cifar", {}),
    "revvit_cifar-bf16": ("revvit_cifar", _BF16),
}


def measure_exactness(quick: bool, batch: int, models: Sequence[str] = ()) -> list[dict]:
    import jax.numpy as jnp

    import revjax

    rows = []
    names = models or list(EXACTNESS_MODELS)
    cases = [("revnet_tiny", {}), ("revvit_tiny", {})] if quick else [
        EXACTNESS_MODELS[m] for m in names
    ]
    size = 8 if quick else 32
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    y = jnp.arange(batch) % 10
    for name, extra in cases:
        extra = {k: jnp.dtype(v) if "dtype" in k else v for k, v in extra.items()}
        vit = name.startswith("revvit")
        grads = {}
        for k in (None, 1):
            model = getattr(revjax, name)(
                rngs=nnx.Rngs(0), arithmetic="fixed", exact_every=k, **extra,
                **({"image_size": size} if vit else {}),
            )  # fmt: skip
            # The rebuild check's counts arrive as the gradient of RebuildMismatches.
            wrt = nnx.Any(nnx.Param, revjax.RebuildMismatches)
            graphdef, params, rest = nnx.split(model, wrt, ...)

            @jax.jit
            def grad(params, rest, graphdef=graphdef):
                def loss(p):
                    logits = nnx.merge(graphdef, p, rest, copy=True)(x, train=True)
                    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
                    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

                return jax.grad(loss)(params)

            grads[k] = jax.device_get(grad(params, rest))
        counted = sum(revjax.rebuild_mismatches(grads[None]).values())
        differ = sum(
            int(np.sum(np.asarray(a) != np.asarray(b)))
            for a, b in zip(jax.tree.leaves(grads[None]), jax.tree.leaves(grads[1]))
        )
        total = sum(np.size(a) for a in jax.tree.leaves(grads[None]))
        rel = float(revjax.relative_error(grads[None], grads[1]))
        mismatches = "-"
        if not vit:
            errors = revjax.reconstruction_error(model, None, None, x)
            mismatches = str(sum(e["mismatches"] for e in errors.values()))
        label = name + "".join(f", {k}={getattr(v, 'name', v)}" for k, v in extra.items())
        rows.append(
            {"model": label, "mismatches": mismatches, "counted": counted, "differ": differ,
             "total": total, "rel": rel}
        )  # fmt: skip
        print(f"  exactness: {rows[-1]}", flush=True)
    return rows


GRADIENT_CASES = [(kind, dtype) for kind in ("conv", "transformer")
                  for dtype in ("float32", "bfloat16")]  # fmt: skip


def _branches(kind: str, dtype, width: int):
    """F and G builders: conv + BatchNorm + ReLU + conv, or LN + attention / LN + GELU MLP."""

    def conv(rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        return nnx.Sequential(
            nnx.Conv(width, width, (3, 3), use_bias=False, **kw),
            nnx.BatchNorm(width, use_running_average=False, use_fast_variance=False, **kw),
            jax.nn.relu,
            nnx.Conv(width, width, (3, 3), use_bias=False, **kw),
        )

    def attention(rngs):
        attn = nnx.MultiHeadAttention(4, width, decode=False, dtype=dtype, rngs=rngs)
        return nnx.Sequential(nnx.LayerNorm(width, dtype=dtype, rngs=rngs), attn)

    def mlp(rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        return nnx.Sequential(
            nnx.LayerNorm(width, **kw), nnx.Linear(width, 4 * width, **kw),
            lambda h: jax.nn.gelu(h, approximate=False), nnx.Linear(4 * width, width, **kw),
        )  # fmt: skip

    return (conv, conv) if kind == "conv" else (attention, mlp)


def gradient_errors(kind: str, dtype: str, n: int, width: int) -> dict[str, float]:
    """Relative gradient errors of one fixed-point `ReversibleSequence`: memory-saving vs
    plain, remat (every unit under `jax.checkpoint`) vs plain, memory-saving vs remat."""
    import jax.numpy as jnp

    import revjax

    make_f, make_g = _branches(kind, jnp.dtype(dtype), width)
    seq = revjax.ReversibleSequence(make_f, make_g, n, rngs=nnx.Rngs(0), arithmetic="fixed")
    shape = (4, 8, 8, width) if kind == "conv" else (4, 32, width)
    x1 = jax.random.normal(jax.random.key(1), shape)
    x2 = jax.random.normal(jax.random.key(2), shape)
    (f_def, f_state), (g_def, g_state) = nnx.split(seq.f), nnx.split(seq.g)
    f_call, g_call = revjax.pure_call(f_def), revjax.pure_call(g_def)

    def grad(memory_saving, remat):
        def loss(params, x1, x2):
            y1, y2 = revjax.reversible_sequence(
                f_call, g_call, *params, x1, x2, has_aux=True, arithmetic="fixed",
                memory_saving=memory_saving, remat=remat,
            )[0]  # fmt: skip
            return jnp.sum(y1 * jnp.cos(y2))

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return jax.device_get(step((f_state, g_state), x1, x2))

    with jax.numpy_dtype_promotion("standard"):
        got = {"rev": grad(True, False), "plain": grad(False, False), "remat": grad(False, True)}
    rel = lambda a, b: float(revjax.relative_error(got[a], got[b]))
    leaves = {k: [np.asarray(a, np.float32) for a in jax.tree.leaves(v)] for k, v in got.items()}
    differ = lambda a, b: sum(
        int(np.sum(x != y)) for x, y in zip(leaves[a], leaves[b], strict=True)
    )
    return {
        "rev": rel("rev", "plain"), "remat": rel("remat", "plain"),
        "rev_remat": rel("rev", "remat"), "rev_differ": differ("rev", "plain"),
        "remat_differ": differ("remat", "plain"),
        "total": sum(a.size for a in leaves["plain"]),
        # Every gradient is non-zero: a zero difference is not a zero gradient.
        "zero": sum(int(np.sum(a == 0)) for a in leaves["plain"]),
    }  # fmt: skip


def sequence_mismatches(kind: str, dtype: str, rebuild: str, n: int, width: int) -> float:
    """The in-step count of one training step of a fixed-point `ReversibleSequence` (rolled on
    GPU/TPU, unrolled on CPU): units whose rebuild differed from the forward."""
    import jax.numpy as jnp

    import revjax

    make_f, make_g = _branches(kind, jnp.dtype(dtype), width)
    seq = revjax.ReversibleSequence(
        make_f, make_g, n, rngs=nnx.Rngs(0), arithmetic="fixed", rebuild=rebuild
    )
    shape = (8, 16, 16, width) if kind == "conv" else (4, 64, width)
    x1 = jax.random.normal(jax.random.key(1), shape)
    x2 = jax.random.normal(jax.random.key(2), shape)
    wrt = nnx.Any(nnx.Param, revjax.RebuildMismatches)
    graphdef, diff, rest = nnx.split(seq, wrt, ...)

    @jax.jit
    def grad(diff, rest):
        def loss(diff):
            y1, y2 = nnx.merge(graphdef, diff, rest, copy=True)(x1, x2)
            return jnp.sum(y1 * jnp.cos(y2))

        return jax.grad(loss)(diff)

    with jax.numpy_dtype_promotion("standard"):
        grads = grad(diff, rest)
    return sum(revjax.rebuild_mismatches(grads).values())


def measure_sequence_exactness(quick: bool) -> list[dict]:
    """`sequence_mismatches` for conv and transformer units, both rebuild modes."""
    n, width = (2, 8) if quick else (24, 64)
    rows = []
    for kind, dtype in GRADIENT_CASES:
        row = {"case": f"{kind}, {dtype} compute, {n} units"}
        for rebuild in ("isolated", "pullback"):
            row[rebuild] = sequence_mismatches(kind, dtype, rebuild, n, width)
        rows.append(row)
        print(f"  sequence exactness: {rows[-1]}", flush=True)
    return rows


def sequence_exactness_markdown(rows: Sequence[dict]) -> str:
    table = [[r["case"], f"{r['isolated']:g}", f"{r['pullback']:g}"] for r in rows]
    return "\n".join(
        [
            "## In-step rebuild check of fixed-point sequences on this backend",
            "",
            "One training step of a `ReversibleSequence` (conv: batch 8, 16x16, conv + "
            "BatchNorm + ReLU + conv; transformer: batch 4, 64 tokens, LayerNorm + 4-head "
            "attention / LayerNorm + exact-GELU MLP; width 64, float32 halves, the backend's "
            "default unroll): units whose rebuilt F/G outputs differed from the forward's, as "
            "the backward counts them (`revjax.rebuild_mismatches`), with the default "
            "`rebuild=\"isolated\"` and with `rebuild=\"pullback\"`.",
            "",
            _report.markdown_table(["case", "isolated", "pullback"], table),
            "",
        ]
    )


def measure_gradients(quick: bool) -> list[dict]:
    """`gradient_errors` of every `GRADIENT_CASES` case."""
    n, width = (2, 8) if quick else (16, 64)
    rows = []
    for kind, dtype in GRADIENT_CASES:
        rows.append({"case": f"{kind}, {dtype} compute, {n} units",
                     **gradient_errors(kind, dtype, n, width)})  # fmt: skip
        print(f"  gradients: {rows[-1]}", flush=True)
    return rows


def gradients_markdown(rows: Sequence[dict]) -> str:
    table = [[r["case"], f"{r['rev']:.1e}", f"{r['remat']:.1e}", f"{r['rev_remat']:.1e}",
              f"{r['rev_differ']:,} / {r['remat_differ']:,} of {r['total']:,}",
              f"{r['zero']:,}"]
             for r in rows]  # fmt: skip
    return "\n".join(
        [
            "## Gradients: rounding, not rebuild error",
            "",
            "A fixed-point `ReversibleSequence` (float32 halves and parameters, F/G computing in "
            "the given dtype; batch 4; conv: 8x8, BatchNorm with batch statistics; transformer: "
            "32 tokens, 4 heads), whose rebuild is bit for bit. Relative error (global L2 over "
            "all parameter and input gradients) of the memory-saving gradients against plain "
            "autodiff of the same rounded forward, beside `jax.checkpoint` of every unit "
            "(`remat=True`: what `nnx.remat` does) against plain autodiff: any backward that "
            "recomputes its forward is a different XLA program and rounds differently. "
            "`elements differing`: gradient elements whose bits differ from plain autodiff's "
            "(memory-saving / remat); `zero elements`: plain autodiff's gradient elements that "
            "are exactly 0 (a zero difference is not a vanishing gradient). With bfloat16 "
            "compute every op's result is rounded to bfloat16 (the compiled CPU programs "
            "compute bfloat16 ops in float32 between conversions), which absorbs the "
            "float32-level differences between two programs unless a value sits at a "
            "rounding boundary.",
            "",
            _report.markdown_table(
                ["case", "memory-saving vs plain", "remat vs plain", "memory-saving vs remat",
                 "elements differing", "zero elements"],
                table,
            ),
            "",
        ]
    )


def exactness_markdown(rows: Sequence[dict], batch: int) -> str:
    table = [
        [r["model"], r["mismatches"], f"{r['counted']:g}", f"{r['differ']:,} of {r['total']:,}",
         f"{r['rel']:.1e}"]
        for r in rows
    ]  # fmt: skip
    return "\n".join(
        [
            "## Exactness of the fixed-point rebuild on this backend",
            "",
            f"Batch {batch}, standard-normal images, weights at init, BatchNorm in train mode. "
            "`rebuild mismatches`: rebuilt elements (all reversible units) whose bits differ "
            "from the forward's (`revjax.reconstruction_error`, RevNets). `units counted`: the "
            "train step's own count of units whose rebuild differed (`revjax.rebuild_mismatches` "
            "of the gradients, every model). `gradient elements "
            "differing`: the gradients with `exact_every=None` (everything rebuilt) against "
            "`exact_every=1` (every unit's input stored); 0 means the memory-saving backward "
            "rebuilt every input bit for bit.",
            "",
            _report.markdown_table(
                ["model", "rebuild mismatches", "units counted", "gradient elements differing",
                 "relative"],
                table,
            ),
            "",
        ]
    )


def to_markdown(rows: Sequence[dict], head: str) -> str:
    cols = ["model", *[f"step ms {n}" for n in VARIANTS], "fixed / fixed pullback",
            "fixed / float k=None", "CPU time: fixed / fixed pullback",
            "CPU time: fixed / float k=None", "largest carry", "limit"]  # fmt: skip
    table = [
        [
            r["model"],
            *[_report.fmt_ms(r[f"time {n}"]) for n in VARIANTS],
            f"{r['time fixed, k=None'] / r['time fixed, pullback']:.3f}",
            f"{r['time fixed, k=None'] / r['time float, k=None']:.3f}",
            f"{r['cpu fixed, k=None'] / r['cpu fixed, pullback']:.3f}",
            f"{r['cpu fixed, k=None'] / r['cpu float, k=None']:.3f}",
            f"{r['peak']:.1f}",
            f"{carry_limit(FRAC_BITS):g}",
        ]
        for r in rows
    ]
    return "\n".join([head, "", _report.markdown_table(cols, table), ""])


def range_markdown(rows: Sequence[dict]) -> str:
    limit = carry_limit(FRAC_BITS)
    table = [
        [r["model"], r["downsample"], f"{r['size']}x{r['size']}", f"{r['peak']:.1f}",
         f"{limit / r['peak']:.0f}x"]
        for r in rows
    ]  # fmt: skip
    worst = max(rows, key=lambda r: r["peak"])
    return "\n".join(
        [
            "## Carry range after init",
            "",
            "Largest magnitude of any carry or rounded F/G output (`revjax.CarryPeak`), one "
            "forward in train mode on standard-normal images (batch 2), weights at init; "
            f"limit `carry_limit({FRAC_BITS})` = {limit:g}.",
            "",
            _report.markdown_table(["model", "downsample", "input", "largest carry", "margin"],
                                   table),
            "",
            f"Largest: {worst['peak']:.1f} ({worst['model']}, {worst['downsample']}, "
            f"{worst['size']}x{worst['size']}), {limit / worst['peak']:.0f}x below the limit.",
            "",
        ]
    )  # fmt: skip


def digits_markdown(rows: Sequence[dict]) -> str:
    table = [
        [r["arithmetic"], r["model"], r["steps"], f"{100 * r['accuracy']:.1f} %",
         f"{r['loss']:.4f}", "-" if np.isnan(r["peak"]) else f"{r['peak']:.1f}"]
        for r in rows
    ]  # fmt: skip
    return "\n".join(
        [
            "## Digits job, both arithmetics",
            "",
            "`experiments.configs.digits` (the offline job), trained from the same seed with "
            "each arithmetic (`exact_every`: the model default for float); test accuracy on the "
            "300 held-out digits, mean train loss of the last logging window, largest carry "
            "magnitude reached during training (fixed point).",
            "",
            _report.markdown_table(
                ["arithmetic", "model", "steps", "test accuracy", "train loss", "largest carry"],
                table,
            ),
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, seconds (CI)")
    parser.add_argument("--models", nargs="+", default=["revnet_tiny", "revnet38", "revvit_cifar"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side (square)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--range", action="store_true", help="carry range of every preset")
    parser.add_argument("--digits", action="store_true", help="train the digits job, both ways")
    parser.add_argument("--exactness", action="store_true", help="bit-exact rebuild check")
    parser.add_argument(
        "--exactness-models", nargs="+", default=[], choices=list(EXACTNESS_MODELS),
        help="with --exactness: these models only (default: all)",
    )
    parser.add_argument(
        "--gradients", action="store_true", help="reversible and remat gradients vs plain"
    )
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip step time")
    parser.add_argument(
        "--workdir", type=Path, default=Path("workdirs/bench_arithmetic"),
        help="where --digits trains (a new folder per run and arithmetic)",
    )
    args = parser.parse_args(argv)
    models = ["revnet_tiny"] if args.quick else args.models
    batch, size, repeats = (4, 8, 2) if args.quick else (args.batch, args.size, args.repeats)
    rows = []
    for model in models if args.speed else ():
        tiny = model == "revnet_tiny"
        # The digits job's model: widths 16/16/32 on 8x8 grey images.
        overrides = {"widths": (16, 16, 32)} if tiny else {}
        rows.append(
            measure(
                model, overrides, batch=batch, size=8 if tiny else size, channels=1 if tiny else 3,
                repeats=repeats,
            )
        )  # fmt: skip
    head = _report.header(
        "Fixed-point vs floating-point reversible arithmetic: train-step time",
        f"batch {batch}, {size}x{size} (revnet_tiny: 8x8x1), float32, the trainer's step; "
        f"median of {repeats} interleaved rounds of wall time, then of process CPU time (all "
        "threads)",
        _report.command_line(MODULE, argv),
    )
    text = to_markdown(rows, head) if rows else head + "\n"
    # Written after every section: a run stopped by a time limit keeps what it measured.
    _report.write_report(args.out_dir, NAME, text)
    sections = []
    if args.gradients:
        sections.append(lambda: gradients_markdown(measure_gradients(args.quick)))
    if args.exactness:
        sections.append(
            lambda: sequence_exactness_markdown(measure_sequence_exactness(args.quick))
        )
        sections.append(lambda: exactness_markdown(
            measure_exactness(args.quick, batch, args.exactness_models), batch
        ))  # fmt: skip
    if args.digits:
        sections.append(lambda: digits_markdown(measure_digits(args.quick, args.workdir)))
    if args.range:
        sections.append(lambda: range_markdown(measure_range(args.quick)))
    for section in sections:
        text += "\n" + section()
        _report.write_report(args.out_dir, NAME, text)
    return rows


if __name__ == "__main__":
    main()
