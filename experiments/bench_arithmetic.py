"""Step time and carry range of fixed-point against floating-point reversible arithmetic.

For each RevNet preset, runs the trainer's full train step (forward, rebuilding backward, SGD
update) with

- ``float, k=8``: floating-point carries with stored inputs every 8 units (the paper's
  arithmetic with revjax's drift bound),
- ``float, k=None``: floating-point carries, nothing stored,
- ``fixed, k=None``: int32 fixed-point carries (16 fraction bits), nothing stored,

and reports the median step time, the three samples interleaved (round-robin) so the ratios
are measured side by side under the same load. Also reports the largest fixed-point carry
magnitude after the timed steps (`revjax.CarryPeak`), against `revjax.carry_limit`.

``--range``: the largest carry magnitude of every reversible preset (both downsampling modes
for the RevNets) after init, one forward in train mode on standard-normal images at the
preset's native size and at 224x224. ``--digits``: the offline digits job
(`experiments.configs.digits`) trained with each arithmetic: test accuracy, final loss, and
the largest carry magnitude reached during training. ``--exactness``: on the current backend
(the GPU check runs it), whether the fixed-point backward rebuilds bit for bit: rebuilt
elements whose bits differ from the forward's (`revjax.reconstruction_error`), and the
gradients with nothing stored (``exact_every=None``) against those with every unit's input
stored (``exact_every=1``), which agree bit for bit exactly when the rebuild is exact.

    python -m experiments.bench_arithmetic                    # revnet38, revnet_tiny
    python -m experiments.bench_arithmetic --models revnet110 --batch 16
    python -m experiments.bench_arithmetic --range --digits   # add the range and digits tables
    python -m experiments.bench_arithmetic --quick            # seconds, for CI

Writes ``<out-dir>/bench_arithmetic.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from experiments import _report
from revjax import CarryPeak, carry_limit
from revjax.measure import time_interleaved

NAME = "bench_arithmetic"
MODULE = f"experiments.{NAME}"

VARIANTS = {
    "float, k=8": {"arithmetic": "float", "exact_every": 8},
    "float, k=None": {"arithmetic": "float", "exact_every": None},
    "fixed, k=None": {"arithmetic": "fixed", "exact_every": None},
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


def measure(model: str, overrides: dict, *, batch: int, size: int, channels: int, repeats: int):
    fns = {}
    for name, variant in VARIANTS.items():
        step, state, data = _report.concrete_train_step(
            model, {**overrides, **variant}, batch_size=batch, image_size=size,
            in_channels=channels,
        )  # fmt: skip
        fns[name] = (step, (state, data))
    times = time_interleaved(fns, warmup=2, repeats=repeats)
    step, (state, data) = fns["fixed, k=None"]
    for _ in range(3):
        state, _ = step(state, data)
    row = {"model": model, **{f"time {n}": times[n]["median"] for n in VARIANTS}}
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
        result_state, result = train.train_and_evaluate(cfg, workdir / arithmetic)
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


EXACTNESS_MODELS = [
    ("revnet38", {}),
    ("revnet164", {}),
    ("revnet164", {"downsample": "invertible"}),
    ("revnet164", {"dtype": "bfloat16", "carry_dtype": "float32"}),
    ("revvit_cifar", {}),
    ("revvit_cifar", {"dtype": "bfloat16", "carry_dtype": "float32"}),
]


def measure_exactness(quick: bool, batch: int) -> list[dict]:
    import jax.numpy as jnp

    import revjax

    rows = []
    cases = [("revnet_tiny", {}), ("revvit_tiny", {})] if quick else EXACTNESS_MODELS
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
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            @jax.jit
            def grad(params, rest, graphdef=graphdef):
                def loss(p):
                    logits = nnx.merge(graphdef, p, rest, copy=True)(x, train=True)
                    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
                    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

                return jax.grad(loss)(params)

            grads[k] = jax.device_get(grad(params, rest))
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
            {"model": label, "mismatches": mismatches, "differ": differ, "total": total,
             "rel": rel}
        )  # fmt: skip
        print(f"  exactness: {rows[-1]}", flush=True)
    return rows


def exactness_markdown(rows: Sequence[dict], batch: int) -> str:
    table = [
        [r["model"], r["mismatches"], f"{r['differ']:,} of {r['total']:,}", f"{r['rel']:.1e}"]
        for r in rows
    ]
    return "\n".join(
        [
            "## Exactness of the fixed-point rebuild on this backend",
            "",
            f"Batch {batch}, standard-normal images, weights at init, BatchNorm in train mode. "
            "`rebuild mismatches`: rebuilt elements (all reversible units) whose bits differ "
            "from the forward's (`revjax.reconstruction_error`, RevNets). `gradient elements "
            "differing`: the gradients with `exact_every=None` (everything rebuilt) against "
            "`exact_every=1` (every unit's input stored); 0 means the memory-saving backward "
            "rebuilt every input bit for bit.",
            "",
            _report.markdown_table(
                ["model", "rebuild mismatches", "gradient elements differing", "relative"],
                table,
            ),
            "",
        ]
    )


def to_markdown(rows: Sequence[dict], head: str) -> str:
    cols = ["model", *[f"step ms {n}" for n in VARIANTS], "fixed / float k=None",
            "fixed / float k=8", "largest carry", "limit"]  # fmt: skip
    table = [
        [
            r["model"],
            *[_report.fmt_ms(r[f"time {n}"]) for n in VARIANTS],
            f"{r['time fixed, k=None'] / r['time float, k=None']:.3f}",
            f"{r['time fixed, k=None'] / r['time float, k=8']:.3f}",
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
    parser.add_argument("--models", nargs="+", default=["revnet_tiny", "revnet38"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side (square)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--range", action="store_true", help="carry range of every preset")
    parser.add_argument("--digits", action="store_true", help="train the digits job, both ways")
    parser.add_argument("--exactness", action="store_true", help="bit-exact rebuild check")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip step time")
    parser.add_argument("--workdir", type=Path, default=Path("workdirs/bench_arithmetic"))
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
        f"median of {repeats} interleaved rounds",
        _report.command_line(MODULE, argv),
    )
    text = to_markdown(rows, head) if rows else head + "\n"
    if args.range:
        text += "\n" + range_markdown(measure_range(args.quick))
    if args.exactness:
        text += "\n" + exactness_markdown(measure_exactness(args.quick, batch), batch)
    if args.digits:
        text += "\n" + digits_markdown(measure_digits(args.quick, args.workdir))
    _report.write_report(args.out_dir, NAME, text)
    return rows


if __name__ == "__main__":
    main()
