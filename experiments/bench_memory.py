"""Benchmark 1, memory vs depth: train-step memory of RevNet variants and their ResNet twins.

Sweeps units per stage (1..18 by default) at fixed widths, batch 128, 32x32 images, for

- RevNet with memory saving on (the reversible backward rebuilds activations; defaults:
  transition units recomputed in the backward),
- the same RevNet with memory saving off (plain autodiff through the same parameters),
- the RevNet with stored transition (entry) units (the paper's code),
- the RevNet with invertible downsampling (i-RevNet transitions; a wider network),
- the ResNet twin (same blocks, units per stage and total widths; ordinary residual units),
- the ResNet with `jax.checkpoint` around every unit,

and reports compiled temporary bytes of the trainer's full train step (forward, backward,
optimizer update; `memory_analysis()`, compiled on abstract shapes, so nothing is allocated),
with scans rolled (``unroll=1``), which is what GPU/TPU run; unrolled CPU scans add a little
temp per unit. On an accelerator it also runs every configuration and reads the device's peak
bytes in use (one fresh process per line, depths in ascending order, because the allocator's
peak never goes down). The least-squares slope of each line, in bytes per unit per stage, is
the headline: the RevNet line is flat.

    python -m experiments.bench_memory                       # 1..18 units per stage
    python -m experiments.bench_memory --depths 1 2 4 9 18   # fewer points
    python -m experiments.bench_memory --quick               # seconds, for CI
    python -m experiments.bench_memory --target h100 --depths 1 2 4 9 18   # compiled for an H100

``--target NAME`` compiles every point ahead of time for that GPU/TPU (`experiments.aot`; nothing
runs) and writes ``bench_memory_<target>.md`` / ``.png``.

Writes ``<out-dir>/bench_memory.md`` and ``<out-dir>/bench_memory.png``.
"""

from __future__ import annotations

import os

# A GPU parent process must not reserve 75% of the device before its workers start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from experiments import _report, aot  # noqa: E402
from revjax.measure import compiled_memory, device_peak_bytes  # noqa: E402
from revjax.models import RevNet  # noqa: E402

NAME = "bench_memory"
MODULE = f"experiments.{NAME}"

# RevNet's default for its stage-entry units: recomputed in the backward (True) or stored.
_REMAT_DEFAULT = bool(inspect.signature(RevNet.__init__).parameters["remat_transitions"].default)

# key: (label, preset whose architecture is overridden, constructor overrides)
LINES = {
    "rev": ("RevNet", "revnet_tiny", {}),
    "rev_plain": ("RevNet, memory saving off", "revnet_tiny", {"memory_saving": False}),
    # the transition setting that is not the default
    "rev_transitions": (
        f"RevNet, remat_transitions={not _REMAT_DEFAULT}",
        "revnet_tiny",
        {"remat_transitions": not _REMAT_DEFAULT},
    ),
    # one reversible chain across the stages, storing nothing but its output (no exact_every)
    "rev_inv": (
        "RevNet, invertible downsampling, exact_every=None",
        "revnet_tiny",
        {"downsample": "invertible", "exact_every": None},
    ),
    "res": ("ResNet twin", "resnet_tiny", {}),
    "res_ckpt": ("ResNet, checkpoint per unit", "resnet_tiny", {"remat_units": True}),
}

FULL = dict(depths=list(range(1, 19)), widths=[32, 32, 64, 128], batch=128, size=32)
QUICK = dict(depths=[2, 3], widths=[4, 8], batch=2, size=8)


def _overrides(key: str, units: int, widths: list[int]) -> dict:
    num_stages = len(widths) - 1
    return {
        **LINES[key][2],
        "units_per_stage": (units,) * num_stages,
        "widths": tuple(widths),
        "unroll": 1,  # rolled scans: the accelerator configuration, compile time flat in depth
    }


def measure_line(key: str, depths, widths, batch, size, *, device_peak: bool) -> list[dict]:
    """Memory of one line at each depth (ascending).

    Args:
      key: a `LINES` key.
      depths: units per stage to measure.
      widths: ``[stem, stage 1, ...]`` total channels.
      batch: images per step.
      size: image side length.
      device_peak: also run each step on the device and read its peak bytes in use; only
        meaningful in a fresh process with depths ascending (the peak is a high-water mark).

    Returns:
      One record per depth: ``units``, ``params``, the compiled fields (``temp``,
      ``argument``, ``output``, ...) and, with ``device_peak``, ``device_peak``.
    """
    _, preset, _ = LINES[key]
    records = []
    for units in sorted(depths):
        overrides = _overrides(key, units, widths)
        if device_peak:
            step, state, data = _report.concrete_train_step(
                preset, overrides, batch_size=batch, image_size=size
            )
            compiled = step.lower(state, data).compile()
            record = dict(compiled_memory(compiled))
            out = compiled(state, data)
            jax.block_until_ready(out)
            record["device_peak"] = device_peak_bytes()
            del out, state, data
        else:
            step, state, data = _report.abstract_train_step(
                preset, overrides, batch_size=batch, image_size=size
            )
            record = dict(_report.compiled_step_memory(step, state, data))
        record.update(units=units, params=_report.num_params(state))
        records.append(record)
        print(
            f"  {LINES[key][0]}: {units} units per stage, temp "
            f"{_report.fmt_mib(record.get('temp'))} MiB",
            flush=True,
        )
    return records


def _peak_worker(args) -> None:
    """Entry point of a fresh process measuring one line with device peaks (JSON lines)."""
    for record in measure_line(
        args.peak_worker, args.depths, args.widths, args.batch, args.size, device_peak=True
    ):
        print(json.dumps(record), flush=True)


def run(cfg: dict, *, device_peak: bool, worker_timeout: float) -> dict[str, list[dict]]:
    """Measures every line; device peaks through one worker process per line."""
    results = {}
    for key in LINES:
        if device_peak:
            args = [
                "--peak-worker",
                key,
                "--depths",
                *map(str, cfg["depths"]),
                "--widths",
                *map(str, cfg["widths"]),
                "--batch",
                str(cfg["batch"]),
                "--size",
                str(cfg["size"]),
            ]
            results[key] = _report.run_json_worker(MODULE, args, timeout=worker_timeout)
            print(f"  measured {LINES[key][0]} (fresh process)", flush=True)
        else:
            results[key] = measure_line(
                key, cfg["depths"], cfg["widths"], cfg["batch"], cfg["size"], device_peak=False
            )
    return results


def run_on_target(
    cfg: dict, target: str, python: str | None, processes: int = 1, cache=None
) -> tuple[dict, dict]:
    """Every line at every depth, compiled ahead of time for ``target`` (``cache``: an
    `aot.CompileCache` file)."""
    jobs = [
        aot.job(
            LINES[key][1],
            _overrides(key, units, cfg["widths"]),
            batch=cfg["batch"],
            size=cfg["size"],
            key=[key, units],
        )
        for key in LINES
        for units in sorted(cfg["depths"])
    ]

    def progress(r: dict) -> None:
        key, units = r["key"]
        what = r["error"][:200] if "error" in r else f"temp {_report.fmt_mib(r['temp'])} MiB"
        print(f"  {LINES[key][0]}: {units} units per stage, {what}", flush=True)

    info, records = aot.compile_for_target(
        target, jobs, python=python, on_record=progress, processes=processes, cache=cache
    )
    aot.require_compiled(records, NAME)
    results = {key: [] for key in LINES}
    for r in records:
        key, units = r["key"]
        results[key].append({**r, "units": units})
    return info, results


def slopes(results: dict[str, list[dict]], field: str = "temp") -> dict[str, float]:
    """Least-squares bytes per unit (per stage) of each line."""
    return {
        key: _report.fit_slope([r["units"] for r in recs], [r[field] for r in recs])
        for key, recs in results.items()
        if recs and all(r.get(field) is not None for r in recs)
    }


def _has_device_peak(results: dict[str, list[dict]]) -> bool:
    return all(r.get("device_peak") is not None for recs in results.values() for r in recs)


def to_markdown(results: dict[str, list[dict]], head: str) -> str:
    keys = list(results)
    has_peak = _has_device_peak(results)
    depths = [r["units"] for r in results[keys[0]]]
    by_units = {k: {r["units"]: r for r in results[k]} for k in keys}
    unit, div = _report.byte_unit(r["temp"] for recs in results.values() for r in recs)
    size = lambda b: "-" if b is None else f"{b / div:.1f}"

    columns = ["units per stage"] + [f"temp {unit}: {LINES[k][0]}" for k in keys]
    if has_peak:
        columns += [f"device peak {unit}: {LINES[k][0]}" for k in keys]
    columns += ["plain / reversible temp"]
    rows = []
    for n in depths:
        row = [n] + [size(by_units[k][n]["temp"]) for k in keys]
        if has_peak:
            row += [size(by_units[k][n]["device_peak"]) for k in keys]
        ratio = by_units["rev_plain"][n]["temp"] / max(by_units["rev"][n]["temp"], 1)
        rows.append(row + [f"{ratio:.2f}"])
    temp_slopes = slopes(results, "temp")
    peak_slopes = slopes(results, "device_peak") if has_peak else {}
    kib = lambda b: f"{b / 2**10:,.1f}"
    slope_row = ["**slope, KiB per unit**"] + [kib(temp_slopes[k]) for k in keys]
    if has_peak:
        slope_row += [kib(peak_slopes[k]) for k in keys]
    rows.append(slope_row + [""])

    summary_cols = [
        "line",
        "temp slope (bytes per unit per stage)",
        "vs ResNet twin slope",
        f"temp {unit} at {depths[0]}",
        f"temp {unit} at {depths[-1]}",
        f"params at {depths[-1]}",
    ]
    if has_peak:
        summary_cols.insert(2, "device-peak slope (bytes per unit)")
    res_slope = temp_slopes.get("res") or float("nan")
    summary = []
    for k in keys:
        row = [
            LINES[k][0],
            f"{temp_slopes[k]:,.0f}",
            f"{temp_slopes[k] / res_slope:.3f}",
            size(by_units[k][depths[0]]["temp"]),
            size(by_units[k][depths[-1]]["temp"]),
            f"{by_units[k][depths[-1]]['params']:,}",
        ]
        if has_peak:
            row.insert(2, f"{peak_slopes[k]:,.0f}")
        summary.append(row)
    return "\n".join(
        [
            head,
            "",
            _report.markdown_table(columns, rows),
            "",
            "Slopes (least squares over the depths above):",
            "",
            _report.markdown_table(summary_cols, summary),
        ]
    )


def plot(results: dict[str, list[dict]], path: Path, title: str) -> Path:
    field = "device_peak" if _has_device_peak(results) else "temp"
    unit, div = _report.byte_unit(r[field] for recs in results.values() for r in recs)
    series = {
        LINES[k][0]: ([r["units"] for r in recs], [r[field] / div for r in recs])
        for k, recs in results.items()
    }
    what = "device peak" if field == "device_peak" else "compiled temp"
    return _report.plot_lines(
        path, series, title=title, xlabel="units per stage", ylabel=f"{what} {unit}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=None,
        help="units per stage to sweep (default 1..18)",
    )
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="total channels: stem, then one per stage (default 32 32 64 128)",
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side (square)")
    parser.add_argument(
        "--device-peak",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run each step and read device peak bytes (default: on GPU/TPU)",
    )
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=600.0,
        help="seconds per line's worker process (device peaks)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--peak-worker", choices=list(LINES), help=argparse.SUPPRESS)
    aot.add_target_arguments(parser)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for name in cfg:
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    args.depths, args.widths, args.batch, args.size = (
        cfg["depths"],
        cfg["widths"],
        cfg["batch"],
        cfg["size"],
    )
    if args.peak_worker:
        _peak_worker(args)
        return None

    if args.target:
        return _main_target(args, cfg, argv)
    device_peak = args.device_peak
    if device_peak is None:
        device_peak = jax.default_backend() != "cpu"
    stages = len(cfg["widths"]) - 1
    head = _report.header(
        "Memory vs depth",
        f"train step (SGD + momentum, BatchNorm) of RevNet / ResNet, basic blocks, {stages} "
        f"stages, widths {'/'.join(map(str, cfg['widths']))} (ResNet twin: same units per stage "
        f"and total widths), batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, float32; "
        "compiled temp bytes of `memory_analysis()` with rolled scans (unroll=1, the GPU/TPU "
        "configuration"
        + (
            "; XLA:CPU backend optimisation level 0, same bytes"
            if jax.default_backend() == "cpu"
            else ""
        )
        + ")"
        + (
            "; device peak = allocator high-water mark, one fresh process per line, depths "
            "ascending"
            if device_peak
            else ""
        ),
        _report.command_line(MODULE, argv),
    )
    print(head, flush=True)
    results = run(cfg, device_peak=device_peak, worker_timeout=args.worker_timeout)
    text = to_markdown(results, head)
    _report.write_report(args.out_dir, NAME, text)
    png = plot(
        results,
        args.out_dir / f"{NAME}.png",
        f"Train-step memory vs depth, batch {cfg['batch']}, {cfg['size']}x{cfg['size']}",
    )
    print(f"wrote {png}")
    return results


def _main_target(args, cfg: dict, argv) -> dict:
    """``--target``: the same table and plot, compiled for a GPU/TPU target (nothing runs)."""
    target = aot.get_target(args.target)
    stages = len(cfg["widths"]) - 1
    print(f"compiling {len(LINES) * len(cfg['depths'])} train steps for {target.name}", flush=True)
    info, results = run_on_target(
        cfg, target.name, args.aot_python, args.processes, cache=args.cache
    )
    head = _report.target_header(
        "Memory vs depth",
        f"train step (SGD + momentum, BatchNorm) of RevNet / ResNet, basic blocks, {stages} "
        f"stages, widths {'/'.join(map(str, cfg['widths']))} (ResNet twin: same units per stage "
        f"and total widths), batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, float32; "
        "compiled temp bytes of `memory_analysis()` with rolled scans (unroll=1). "
        + aot.lower_bound_note(target),
        _report.command_line(MODULE, argv),
        aot.describe(target, info),
    )
    name = f"{NAME}_{target.name}"
    _report.write_report(args.out_dir, name, to_markdown(results, head))
    png = plot(
        results,
        args.out_dir / f"{name}.png",
        f"Train-step memory vs depth, {target.description}, batch {cfg['batch']}, "
        f"{cfg['size']}x{cfg['size']} (compiled)",
    )
    print(f"wrote {png}")
    return results


if __name__ == "__main__":
    main()
