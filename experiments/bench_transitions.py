"""Benchmark of a RevNet's stage transitions: stored, recomputed, or fully reversible.

A RevNet stage starts with an entry unit that changes stride and width, so its input cannot be
rebuilt from its output. Three ways to handle it, compared on each preset with the trainer's
full train step (forward, backward, SGD + momentum):

- ``store``: the paper's code, the entry unit keeps its activations for the backward
  (``remat_transitions=False``);
- ``remat``: the entry unit stores only its input and recomputes its activations in the
  backward (``remat_transitions=True``; a custom VJP tied to the cotangent);
- ``invertible``: i-RevNet transitions (``downsample="invertible"``): space-to-depth plus zero
  channel padding, so every unit is reversible (a different network: other parameter counts).

Columns: parameters; compiled temporary memory of the step with rolled scans (``unroll=1``,
what GPU/TPU run; XLA ``memory_analysis()``); XLA ``cost_analysis()`` flops of the step as
timed (default unroll: fully unrolled on CPU, so every unit is counted); median step time of
interleaved rounds and the median of the per-round time ratios against ``store`` (the order of
the variants alternates between rounds, so neither always runs first).

    python -m experiments.bench_transitions --presets revnet38 revnet110 revnet164 --batch 32
    python -m experiments.bench_transitions --quick        # seconds, tiny model (CI)

Writes ``<out-dir>/bench_transitions.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from experiments import _report
from revjax.measure import compiled_memory

NAME = "bench_transitions"
MODULE = f"experiments.{NAME}"

#: variant -> RevNet overrides; every variant names its transition setting explicitly.
VARIANTS = {
    "store": {"remat_transitions": False},
    "remat": {"remat_transitions": True},
    "invertible": {"downsample": "invertible"},
}
PRESETS = ("revnet38", "revnet110", "revnet164")
QUICK_OVERRIDES = {"units_per_stage": (2, 2), "widths": (8, 8, 16)}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def measure(
    preset: str,
    variants: Sequence[str],
    *,
    batch: int,
    size: int,
    base: dict,
    repeats: int,
    timing: bool = True,
    unroll: int | None = None,
) -> dict[str, dict]:
    """Params, rolled temp bytes, flops and step times of ``preset`` in each variant (``unroll``:
    the scans of the timed step; None: the backend's default)."""
    out: dict[str, dict] = {}
    runs = {}
    # Compiled only for bytes and flops (never run): backend optimisation off on CPU, same HLO.
    options = _report.CPU_MEMORY_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    for name in variants:
        overrides = {**base, **VARIANTS[name]}
        if unroll is not None:
            overrides["unroll"] = unroll
        rolled = {**overrides, "unroll": 1}
        step, state, data = _report.abstract_train_step(
            preset, rolled, batch_size=batch, image_size=size
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, data).compile(compiler_options=options)
        rolled_compile_s = time.perf_counter() - t0
        temp = compiled_memory(compiled)["temp"]
        row = {"params": _report.num_params(state), "temp": temp}
        if not timing and rolled == overrides:  # the flops' program is this one
            row["compile"] = rolled_compile_s
        elif timing:
            step, state, data = _report.concrete_train_step(
                preset, overrides, batch_size=batch, image_size=size
            )
            t0 = time.perf_counter()
            compiled = step.lower(state, data).compile()
            runs[name] = (compiled, state, data)
        else:  # abstract, backend optimisation off: the same HLO flops, nothing runs
            step, state, data = _report.abstract_train_step(
                preset, overrides, batch_size=batch, image_size=size
            )
            t0 = time.perf_counter()
            compiled = step.lower(state, data).compile(compiler_options=options)
        row.setdefault("compile", time.perf_counter() - t0)
        row["flops"] = _flops(compiled)
        out[name] = row
        print(
            f"  {preset} {name}: params {row['params']:,}, temp {temp / 2**20:.1f} MiB, "
            f"{row['flops'] / 1e9:.2f} GFLOP, compile {row['compile']:.1f} s",
            flush=True,
        )
    if not timing:
        return out
    for compiled, state, data in runs.values():  # warm-up
        jax.block_until_ready(compiled(state, data))
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            compiled, state, data = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(state, data))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name in names:
        w, c = wall[name], cpu[name]
        out[name]["median"] = statistics.median(w)
        out[name]["ratio"] = statistics.median(a / b for a, b in zip(w, wall[names[0]]))
        out[name]["cpu_median"] = statistics.median(c)
        out[name]["cpu_ratio"] = statistics.median(a / b for a, b in zip(c, cpu[names[0]]))
    print(
        f"  {preset} step ms wall (ratio) / cpu (ratio): "
        + ", ".join(
            f"{n} {out[n]['median'] * 1e3:.1f} ({out[n]['ratio']:.3f}) / "
            f"{out[n]['cpu_median'] * 1e3:.1f} ({out[n]['cpu_ratio']:.3f})"
            for n in names
        ),
        flush=True,
    )
    return out


def to_markdown(results: dict[str, dict[str, dict]], head: str, timing: bool) -> str:
    cols = ["preset", "variant", "params", "temp MiB (rolled)", "GFLOP / step", "flops vs store"]
    if timing:
        cols += ["step ms wall", "wall vs store", "step ms CPU", "CPU vs store"]
    rows = []
    for preset, by_variant in results.items():
        ref = next(iter(by_variant.values()))
        for name, r in by_variant.items():
            row = [
                preset,
                name,
                f"{r['params']:,}",
                f"{r['temp'] / 2**20:.1f}",
                f"{r['flops'] / 1e9:.3f}",
                f"{r['flops'] / ref['flops']:.4f}",
            ]
            if timing:
                row += [
                    f"{r['median'] * 1e3:.1f}",
                    f"{r['ratio']:.3f}",
                    f"{r['cpu_median'] * 1e3:.1f}",
                    f"{r['cpu_ratio']:.3f}",
                ]
            rows.append(row)
    notes = (
        "`store`: entry units keep their activations (the paper's code, "
        "`remat_transitions=False`); `remat`: they store only their inputs and recompute in the "
        "backward (`remat_transitions=True`); `invertible`: i-RevNet transitions "
        '(`downsample="invertible"`), every unit reversible. Temp: compiled temporary bytes '
        "of the train step with rolled scans (`unroll=1`). Flops: XLA `cost_analysis()` of the "
        "step as timed (default unroll). Step time: medians of interleaved rounds (alternating "
        "order), wall clock and process CPU time (all threads; less sensitive to other "
        "processes on a shared machine); ratios are medians of per-round ratios against "
        "`store`."
    )
    return "\n".join([head, "", _report.markdown_table(cols, rows), "", notes])


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds on a CPU")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="RevNet presets")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side (square)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--no-time", action="store_true", help="memory and flops only")
    parser.add_argument(
        "--unroll",
        type=int,
        default=None,
        help="scan unroll of the timed step (default: the backend's, full on CPU; 1: rolled, "
        "as GPUs/TPUs run, and compiled in seconds on CPU; flops then count a loop body once)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    presets, base, batch, size = args.presets, {}, args.batch, args.size
    if args.quick:
        presets, base, batch, size = ["revnet_tiny"], QUICK_OVERRIDES, 2, 8
    results = {}
    for preset in presets:
        results[preset] = measure(
            preset,
            args.variants,
            batch=batch,
            size=size,
            base=base,
            repeats=2 if args.quick else args.repeats,
            timing=not args.no_time,
            unroll=args.unroll,
        )
    unrolled = (
        "scans at the backend's default unroll"
        if args.unroll is None
        else f"scans unroll={args.unroll} (flops count a rolled loop's body once)"
    )
    head = _report.header(
        "Stage transitions: stored, recomputed, invertible",
        f"trainer's train step, batch {batch}, {size}x{size}, float32, {unrolled}",
        _report.command_line(MODULE, argv),
    )
    _report.write_report(args.out_dir, NAME, to_markdown(results, head, not args.no_time))
    return results


if __name__ == "__main__":
    main()
