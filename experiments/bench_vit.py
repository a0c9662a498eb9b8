"""Benchmark: RevViT vs its ViT twin, train-step memory against depth and step time.

For each depth (6 to 48 blocks) of the CIFAR-sized pair (``revvit_cifar`` / ``vit_cifar``:
32x32 images, patch 4 so 64 tokens, D 192, 3 heads, MLP 4x) it compiles the trainer's full train
step (forward, backward, optimizer; `memory_analysis()` on abstract shapes, nothing allocated)
with rolled scans (``unroll=1``, what GPU/TPU run) and reports the temporary bytes of

- RevViT (reversible backward, memory saving on),
- RevViT with memory saving off (plain autodiff of the same parameters),
- ViT (the twin: same sub-blocks, ordinary residuals, mean pooling),
- ViT with `jax.checkpoint` around every block (the usual gradient-checkpointing baseline),

then times one train step of RevViT (saving on and off) and of ViT at one depth (median of
interleaved runs, rolled scans). Targets: RevViT memory flat in depth (temp at 48
blocks <= 1.10x temp at 12), ViT growing.

    python -m experiments.bench_vit                       # depths 6..48, batch 32 (CPU: minutes)
    python -m experiments.bench_vit --depths 6 12 --batch 8 --time-depth 6
    python -m experiments.bench_vit --quick               # seconds: tiny models, for tests
    python -m experiments.bench_vit --no-time             # memory only (compile only)
    python -m experiments.bench_vit --target h100         # compiled for an H100, nothing runs

With ``--target`` the memory table is compiled ahead of time for that GPU/TPU in a child process
(nothing runs, so no step times) and written as ``bench_vit_<target>.md`` / ``.png``.

Writes ``<out-dir>/bench_vit.md`` and ``<out-dir>/bench_vit.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from experiments import _report, aot
from revjax.measure import time_interleaved

NAME = "bench_vit"
MODULE = f"experiments.{NAME}"

# Memory lines: (label, preset, constructor overrides)
LINES = {
    "rev": ("RevViT", "revvit_cifar", {}),
    "rev_plain": ("RevViT, saving off", "revvit_cifar", {"memory_saving": False}),
    "vit": ("ViT twin", "vit_cifar", {}),
    "vit_ckpt": ("ViT, checkpoint per block", "vit_cifar", {"remat_blocks": True}),
}
# Timed variants at --time-depth: (label, memory line whose model is timed)
TIMED = {"rev": "RevViT", "rev_plain": "RevViT, saving off", "vit": "ViT twin"}

DEPTHS = (6, 12, 24, 48)
SIZE, CLASSES, BATCH = 32, 10, 32

# --quick: the tiny digits models on 8x8 images, a few depths, batch 2.
QUICK = dict(
    depths=(2, 4),
    presets={"revvit_cifar": "revvit_tiny", "vit_cifar": "vit_tiny"},
    size=8,
    batch=2,
    time_depth=2,
)


def measure(
    depths, *, batch: int, size: int, presets: dict, timing: bool, time_depth: int, repeats: int
) -> dict:
    """Temp bytes of every line at every depth, parameter counts, and step times.

    Returns:
      ``{"temp": {line: {depth: bytes}}, "params": {line: {depth: n}}, "time": {variant: s}}``.
    """
    out = {"temp": {k: {} for k in LINES}, "params": {k: {} for k in LINES}, "time": {}}
    for depth in depths:
        for key, (label, preset, overrides) in LINES.items():
            step, state, data = _report.abstract_train_step(
                presets.get(preset, preset),
                {**overrides, "depth": depth, "unroll": 1},
                batch_size=batch,
                image_size=size,
                num_classes=CLASSES,
            )
            out["temp"][key][depth] = _report.compiled_step_memory(step, state, data)["temp"]
            out["params"][key][depth] = _report.num_params(state)
            print(
                f"  depth {depth:3d} {label}: temp {out['temp'][key][depth] / 2**20:.2f} MiB",
                flush=True,
            )
    if timing:
        fns = {}
        for key in TIMED:
            _, preset, overrides = LINES[key]
            step, state, data = _report.concrete_train_step(
                presets.get(preset, preset),
                {**overrides, "depth": time_depth, "unroll": 1},
                batch_size=batch,
                image_size=size,
                num_classes=CLASSES,
            )
            fns[key] = (step, (state, data))
        times = time_interleaved(fns, warmup=2, repeats=repeats)
        out["time"] = {key: t["median"] for key, t in times.items()}
        print(
            "  step ms: "
            + ", ".join(f"{TIMED[k]} {_report.fmt_ms(t)}" for k, t in out["time"].items()),
            flush=True,
        )
    return out


def measure_on_target(args, depths, *, batch: int, size: int, presets: dict) -> tuple[dict, dict]:
    """The memory half of `measure`, compiled for ``args.target`` (`experiments.aot`).

    Returns:
      ``(info, results)``: the target's description and `measure`'s dict without step times.
    """
    jobs = [
        aot.job(
            presets.get(preset, preset),
            {**overrides, "depth": depth, "unroll": 1},
            batch=batch,
            size=size,
            num_classes=CLASSES,
            key=[key, depth],
        )
        for depth in depths
        for key, (_, preset, overrides) in LINES.items()
    ]

    def progress(r: dict) -> None:
        key, depth = r["key"]
        what = r["error"][:200] if "error" in r else f"temp {r['temp'] / 2**20:.2f} MiB"
        print(f"  depth {depth:3d} {LINES[key][0]}: {what}", flush=True)

    info, records = aot.compile_for_target(
        args.target,
        jobs,
        python=args.aot_python,
        on_record=progress,
        processes=args.processes,
        cache=args.cache,
    )
    aot.require_compiled(records, NAME)
    out = {"temp": {k: {} for k in LINES}, "params": {k: {} for k in LINES}, "time": {}}
    for r in records:
        key, depth = r["key"]
        out["temp"][key][depth] = r["temp"]
        out["params"][key][depth] = r["params"]
    return info, out


def to_markdown(results: dict, head: str, depths, *, batch: int, time_depth: int) -> str:
    """The memory table (one row per depth), ratios, and the step-time table."""
    unit, div = _report.byte_unit(v for line in results["temp"].values() for v in line.values())
    columns = (
        ["blocks", "params RevViT / ViT"]
        + [f"temp {unit}: {label}" for label, _, _ in LINES.values()]
        + ["RevViT / ViT temp"]
    )
    rows = []
    for d in depths:
        t = {k: results["temp"][k][d] for k in LINES}
        rows.append(
            [d, f"{results['params']['rev'][d]:,} / {results['params']['vit'][d]:,}"]
            + [f"{t[k] / div:.1f}" for k in LINES]
            + [f"{t['rev'] / t['vit']:.3f}"]
        )
    base = 12 if 12 in depths else min(depths)
    deepest = max(depths)
    ratio_cells = [
        f"**temp at {deepest} / at {base} blocks**",
        "",
        *(
            f"**{results['temp'][k][deepest] / results['temp'][k][base]:.3f}**"
            for k in LINES
        ),
        "",
    ]
    rows.append(ratio_cells)
    parts = [head, "", _report.markdown_table(columns, rows), ""]
    if results["time"]:
        t = results["time"]
        columns_t = [f"{label} step ms" for label in TIMED.values()] + [
            "RevViT / ViT",
            "RevViT / RevViT saving off",
        ]
        row = [_report.fmt_ms(t[k]) for k in TIMED] + [
            f"{t['rev'] / t['vit']:.2f}",
            f"{t['rev'] / t['rev_plain']:.2f}",
        ]
        parts += [
            f"Step time at {time_depth} blocks, batch {batch} (median of interleaved runs, "
            "rolled scans):",
            "",
            _report.markdown_table(columns_t, [row]),
            "",
        ]
    parts.append(
        "Temp memory: compiled temporary bytes of the trainer's full train step (SGD recipe), "
        "scans rolled (`unroll=1`). Target: RevViT temp at 48 blocks <= 1.10x at 12 (flat in "
        "depth), ViT growing."
    )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, measures, writes and prints the table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds on a CPU")
    parser.add_argument("--depths", type=int, nargs="+", help=f"blocks (default {DEPTHS})")
    parser.add_argument("--batch", type=int, help=f"images per step (default {BATCH})")
    parser.add_argument("--time-depth", type=int, default=12, help="depth of the timed steps")
    parser.add_argument("--no-time", action="store_true", help="memory only (compile only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--out", "--out-dir", dest="out", default="results", type=Path, help="output directory"
    )
    aot.add_target_arguments(parser)
    args = parser.parse_args(argv)

    if args.quick:
        depths, presets, size = QUICK["depths"], QUICK["presets"], QUICK["size"]
        batch, time_depth = QUICK["batch"], QUICK["time_depth"]
    else:
        depths, presets, size = DEPTHS, {}, SIZE
        batch, time_depth = BATCH, args.time_depth
    depths = tuple(sorted(args.depths or depths))
    batch = args.batch or batch
    print(f"RevViT vs ViT: depths {depths}, batch {batch}, {size}x{size}", flush=True)
    details = f"RevViT vs ViT twin, train-step temp memory against depth, batch {batch}"
    details += " (quick: tiny models)" if args.quick else f" ({size}x{size}, patch 4, D 192)"
    command = _report.command_line(MODULE, argv)
    name, title = NAME, ""
    if args.target:
        target = aot.get_target(args.target)
        info, results = measure_on_target(args, depths, batch=batch, size=size, presets=presets)
        details += "; nothing runs, so no step times. " + aot.lower_bound_note(target)
        head = _report.target_header(NAME, details, command, aot.describe(target, info))
        name, title = f"{NAME}_{target.name}", f", {target.description} (compiled)"
    else:
        results = measure(
            depths,
            batch=batch,
            size=size,
            presets=presets,
            timing=not args.no_time,
            time_depth=time_depth,
            repeats=args.repeats,
        )
        head = _report.header(NAME, details, command)
    text = to_markdown(results, head, depths, batch=batch, time_depth=time_depth)
    _report.write_report(args.out, name, text)
    unit, div = _report.byte_unit(v for line in results["temp"].values() for v in line.values())
    _report.plot_lines(
        args.out / f"{name}.png",
        {
            label: (list(depths), [results["temp"][k][d] / div for d in depths])
            for k, (label, _, _) in LINES.items()
        },
        title=f"Train-step temp memory vs depth (batch {batch}, rolled scans){title}",
        xlabel="blocks",
        ylabel=f"compiled temp {unit}",
    )
    if jax.default_backend() == "cpu" and not args.quick and not args.target:
        print("note: CPU figures; step times on an accelerator differ", flush=True)
    return results


if __name__ == "__main__":
    main()
