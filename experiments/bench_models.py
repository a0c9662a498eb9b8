"""Benchmark of the model zoo: train-step memory and step time of each RevNet preset and its twin.

For every preset pair (RevNet-38 / ResNet-32, RevNet-110 / ResNet-110, RevNet-164 / ResNet-164
on CIFAR at batch 128; RevNet-56 / ResNet-50 and RevNet-104 / ResNet-101 on ImageNet 224x224 at
batch 32) it reports the compiled temporary memory of the trainer's full train step (forward,
backward, optimizer; `memory_analysis()` on abstract shapes, nothing allocated) for

- the RevNet with memory saving on (defaults: transition units recomputed), off, with stored
  transition (entry) units (the paper's code), and with invertible downsampling,
- its ResNet twin, and the ResNet with `jax.checkpoint` around every unit,

with rolled scans (``unroll=1``, what GPU/TPU run; on XLA:CPU straight-line code lets the
scheduler hoist one sequence's reconstruction into the next one's forward and its
optimisation-barrier expansion lets CSE undo `jax.checkpoint`, so only rolled loops show the
saving there), and the median step time of the RevNet with memory saving on and off (default
unroll). Targets: RevNet-164 at most 0.10x the ResNet-164 temp memory, reversible
step time at most 1.30x plain.

    python -m experiments.bench_models                              # all presets (accelerator)
    python -m experiments.bench_models --presets revnet38 --batch 32  # one pair, smaller batch
    python -m experiments.bench_models --quick                      # seconds, tiny models, CPU
    python -m experiments.bench_models --no-time                    # memory only (compile only)
    python -m experiments.bench_models --target h100 --flops        # compiled for an H100

``--target NAME`` compiles every line ahead of time for a GPU/TPU this host does not have
(`experiments.aot`; nothing runs) and writes ``<out-dir>/bench_models_<target>.md``: one row per
model and variant, with the compiled bytes; ``--flops`` adds the FLOPs of the RevNets with their
stage-entry units stored vs recomputed.

Writes ``<out-dir>/bench_models.md``.
"""

from __future__ import annotations

import argparse
import inspect
import threading
from pathlib import Path

import jax

from experiments import _report, aot
from revjax import presets
from revjax.measure import time_interleaved
from revjax.models import RevNet

NAME = "bench_models"
MODULE = f"experiments.{NAME}"

# The paper's RevNets: preset -> (its ResNet twin from the registry, dataset), dataset:
# (image size, classes, default batch).
PAPER_REVNETS = ("revnet38", "revnet110", "revnet164", "revnet56", "revnet104")
PAIRS = {
    rev: (presets.get(rev).twin, "imagenet" if presets.get(rev).image_size == 224 else "cifar")
    for rev in PAPER_REVNETS
}
DATASETS = {"cifar": (32, 10, 128), "imagenet": (224, 1000, 32)}

# RevNet's default for storing (False) or recomputing (True) its stage-entry units.
REMAT_DEFAULT = bool(inspect.signature(RevNet.__init__).parameters["remat_transitions"].default)


def memory_lines() -> dict[str, tuple[str, int, dict]]:
    """Memory columns: ``{key: (label, which model of the pair, constructor overrides)}``.

    Built from the RevNet constructor's current defaults, so the table names what the defaults
    are and shows the transition setting that is not the default (whichever that is), plus
    fully reversible transitions where the installed RevNet has them.
    """
    params = inspect.signature(RevNet.__init__).parameters
    remat = REMAT_DEFAULT
    exact = params["exact_every"].default if "exact_every" in params else None
    arith = params["arithmetic"].default if "arithmetic" in params else None
    defaults = f"remat_transitions={remat}, exact_every={exact}"
    if arith is not None:
        defaults = f"arithmetic={arith!r}, {defaults}"
    lines = {
        "rev": (f"RevNet (defaults: {defaults})", 0, {}),
        "rev_transitions": (
            f"RevNet, remat_transitions={not remat}",
            0,
            {"remat_transitions": not remat},
        ),
    }
    if "downsample" in params:
        lines["rev_invertible"] = (
            "RevNet, downsample='invertible'",
            0,
            {"downsample": "invertible"},
        )
        lines["rev_invertible_flat"] = (
            "RevNet, downsample='invertible', exact_every=None",
            0,
            {"downsample": "invertible", "exact_every": None},
        )
    if arith == "fixed":
        # The paper's float carries, with the periodic exact checkpoint that bounds their drift.
        lines["rev_float"] = (
            "RevNet, arithmetic='float', exact_every=8",
            0,
            {"arithmetic": "float", "exact_every": 8},
        )
    lines.update(
        {
            "rev_plain": ("RevNet, saving off", 0, {"memory_saving": False}),
            "res": ("ResNet twin", 1, {}),
            "res_ckpt": ("ResNet, checkpoint per unit", 1, {"remat_units": True}),
        }
    )
    return lines


MEMORY_LINES = memory_lines()

# --quick: the tiny test models, shrunk further so that the whole run takes seconds on a CPU.
QUICK_PAIR = {"revnet_tiny": (presets.get("revnet_tiny").twin, "tiny")}
QUICK_DATASET = (8, 10, 2)
QUICK_OVERRIDES = {"units_per_stage": (3,), "widths": (4, 8), "strides": (2,)}


def measure_pair(
    rev: str,
    res: str,
    *,
    batch: int,
    size: int,
    num_classes: int,
    base: dict,
    timing: bool,
    repeats: int,
) -> dict:
    """Memory of every line and (optionally) step times for one preset pair.

    Args:
      rev: RevNet preset name.
      res: its ResNet twin's preset name.
      batch: images per step.
      size: square image side.
      num_classes: logits.
      base: constructor overrides applied to both models (e.g. the quick shrink).
      timing: also run reversible and plain steps and time them.
      repeats: timed rounds (interleaved, median).

    Returns:
      ``{"temp": {line: bytes}, "params": {rev, res}, "time": {"rev": s, "plain": s}}``.
    """
    out = {"temp": {}, "params": {}, "time": {}}
    for key, (label, which, overrides) in MEMORY_LINES.items():
        preset = (rev, res)[which]
        step, state, data = _report.abstract_train_step(
            preset,
            {**base, **overrides, "unroll": 1},
            batch_size=batch,
            image_size=size,
            num_classes=num_classes,
        )
        out["temp"][key] = _report.compiled_step_memory(step, state, data)["temp"]
        # The first line of each model is its default architecture (invertible downsampling
        # is a wider network: its count is not the preset's).
        out["params"].setdefault(preset, _report.num_params(state))
        print(f"  {preset} ({label}): temp {out['temp'][key] / 2**20:.2f} MiB", flush=True)
    if timing:
        fns = {}
        for key, overrides in (("rev", {}), ("plain", {"memory_saving": False})):
            step, state, data = _report.concrete_train_step(
                rev,
                {**base, **overrides},
                batch_size=batch,
                image_size=size,
                num_classes=num_classes,
            )
            fns[key] = (step, (state, data))
        times = time_interleaved(fns, warmup=2, repeats=repeats)
        out["time"] = {key: t["median"] for key, t in times.items()}
        print(
            f"  {rev} step: reversible {_report.fmt_ms(out['time']['rev'])} ms, plain "
            f"{_report.fmt_ms(out['time']['plain'])} ms",
            flush=True,
        )
    return out


def to_markdown(results: dict, head: str) -> str:
    """The memory and time table, one row per preset pair."""
    unit, div = _report.byte_unit(v for r in results.values() for v in r["temp"].values())
    size = lambda b: f"{b / div:.1f}"
    columns = (
        ["RevNet (twin)", "batch", "params RevNet / ResNet"]
        + [f"temp {unit}: {label}" for label, _, _ in MEMORY_LINES.values()]
        + ["RevNet / ResNet temp", "step ms reversible", "step ms plain", "reversible / plain"]
    )
    rows = []
    for rev, r in results.items():
        temp, t = r["temp"], r["time"]
        ratio_t = f"{t['rev'] / t['plain']:.2f}" if t else "-"
        rows.append(
            [f"{rev} ({r['twin']})", r["batch"], " / ".join(f"{p:,}" for p in r["params"].values())]
            + [size(temp[key]) for key in MEMORY_LINES]
            + [
                f"{temp['rev'] / temp['res']:.3f}",
                _report.fmt_ms(t.get("rev")),
                _report.fmt_ms(t.get("plain")),
                ratio_t,
            ]
        )
    notes = (
        "Temp memory: compiled temporary bytes of the trainer's full train step, scans rolled "
        "(`unroll=1`). Step time: median of interleaved runs, default unroll. Targets: "
        "RevNet-164 / ResNet-164 temp <= 0.10 (MemCNN measured 0.18), reversible / plain "
        "step time <= 1.30."
    )
    return "\n".join([head, "", _report.markdown_table(columns, rows), "", notes])


def measure_on_target(
    pairs: dict, datasets: dict, base: dict, args, on_partial=None
) -> tuple[dict, dict]:
    """Every memory line of every pair, compiled ahead of time for ``args.target`` in one child
    process (`experiments.aot`); with ``--flops``, the FLOPs of the RevNet with transitions
    stored and recomputed, from the unoptimised program (lowered, fully unrolled, in a CPU child:
    the deviceless GPU compile has no cost analysis, and the program is the same for every
    target)."""
    memory_jobs, flops_jobs = [], []
    for rev, (res, dataset) in pairs.items():
        size, num_classes, batch = datasets[dataset]
        batch = args.batch or batch
        for key, (_, which, overrides) in MEMORY_LINES.items():
            if args.lines and key not in args.lines:
                continue
            memory_jobs.append(
                aot.job(
                    (rev, res)[which],
                    {**base, **overrides, "unroll": 1},
                    batch=batch,
                    size=size,
                    num_classes=num_classes,
                    key=[rev, key, "memory"],
                )
            )
        if not args.lines or "rev" in args.lines:
            # The default RevNet once more with the state donated, as the training loop and
            # `python -m experiments.aot --batch N` compile it (buffer assignment differs).
            memory_jobs.append(
                aot.job(
                    rev,
                    {**base, "unroll": 1},
                    batch=batch,
                    size=size,
                    num_classes=num_classes,
                    donate=True,
                    key=[rev, "rev", "donated"],
                )
            )
        if args.flops:  # fully unrolled: cost analysis counts a rolled loop's body only once
            for key in ("rev", "rev_transitions"):
                flops_jobs.append(
                    aot.job(
                        rev,
                        {**base, **MEMORY_LINES[key][2], "unroll": True},
                        batch=batch,
                        size=size,
                        num_classes=num_classes,
                        compile=False,
                        key=[rev, key, "flops"],
                    )
                )

    def progress(r: dict) -> None:
        rev, key, kind = r["key"]
        if "error" in r:
            what = f"error {r['error'][:200]}"
        elif kind == "flops":
            what = f"{r['lowered_flops'] / 1e9:.2f} GFLOP (unoptimised, unrolled)"
        else:
            what = (
                f"temp {r['temp'] / 2**20:.1f} MiB, compile "
                f"{r['trace_lower_s'] + r['compile_s']:.1f} s"
            )
        print(f"  {r['model']} ({key}, {kind}): {what}", flush=True)

    done: list[dict] = []
    infos: list[dict] = []
    lock = threading.Lock()

    def collect(r: dict) -> None:
        with lock:
            progress(r)
            done.append(r)
            if r["key"][2] != "flops":
                infos[:] = [r["target_info"]]  # the target's, not the FLOPs child's (CPU)
            if on_partial is not None and "error" not in r and infos:
                on_partial(infos[0], _assemble(done, pairs))

    def memory() -> None:
        info, _ = aot.compile_for_target(
            args.target,
            memory_jobs,
            python=args.aot_python,
            on_record=collect,
            processes=args.processes,
            cache=args.cache,
        )
        infos[:] = [info]

    print(
        f"{len(memory_jobs)} compiles for target {args.target}"
        + (f", {len(flops_jobs)} lowerings for FLOPs (CPU child)" if flops_jobs else ""),
        flush=True,
    )
    if flops_jobs:  # at the same time, in their own CPU child
        errors: list[BaseException] = []

        def flops() -> None:
            try:
                aot.compile_for_target("cpu", flops_jobs, on_record=collect)
            except BaseException as error:  # noqa: BLE001 - re-raised below
                errors.append(error)

        thread = threading.Thread(target=flops)
        thread.start()
        memory()
        thread.join()
        if errors:
            raise errors[0]
    else:
        memory()
    failed = [r for r in done if "error" in r]
    if failed:
        raise SystemExit(f"{NAME}: {len(failed)} compiles failed, first: {failed[0]['error']}")
    return infos[0], _assemble(done, pairs)


def _assemble(records: list[dict], pairs: dict) -> dict:
    """``{rev: {"twin", "batch", "size", "lines": {key: {"memory"|"donated"|"flops": record}}}}``
    (``donated``: the default RevNet's step with the state donated)."""
    results = {}
    for rev in pairs:  # in the order of the pairs, whatever order the records came in
        for r in records:
            if r["key"][0] != rev or "error" in r:
                continue
            _, key, kind = r["key"]
            entry = results.setdefault(
                rev, {"twin": pairs[rev][0], "batch": r["batch"], "size": r["size"], "lines": {}}
            )
            entry["lines"].setdefault(key, {})[kind] = r
    return results


def to_markdown_target(results: dict, head: str, target: aot.Target) -> str:
    """One row per (pair, line): params, compiled bytes, ratio to the ResNet twin, compile time;
    then the FLOPs of the transition setting, if measured."""
    columns = [
        "model",
        "variant",
        "batch",
        "params",
        "temp MiB",
        "temp / ResNet twin",
        "argument + output MiB",
        "compile s",
    ]
    # libtpu's own count of the step's HBM: what its compile-time out-of-memory check compares
    # with the chip, where temp_size_in_bytes can exceed the chip's memory for a program it
    # accepts (the exact-arithmetic guide has the measurement). GPU backends report no peak.
    by_peak = target.platform == "tpu"
    peak_at = columns.index("argument + output MiB")  # the peak columns go before it
    if by_peak:
        columns[peak_at:peak_at] = ["peak MiB", "peak / ResNet twin"]
    rows, flops_rows = [], []
    for rev, r in results.items():
        res = r["lines"].get("res", {}).get("memory")
        for key, (label, which, _) in MEMORY_LINES.items():
            m = r["lines"].get(key, {}).get("memory")
            if m is None:
                continue
            row = [
                (rev, r["twin"])[which],
                label,
                r["batch"],
                f"{m['params']:,}",
                _report.fmt_mib(m["temp"]),
                "-" if res is None else f"{m['temp'] / res['temp']:.3f}",
                _report.fmt_mib(m["argument"] + m["output"]),
                f"{m['trace_lower_s'] + m['compile_s']:.1f}",
            ]
            if by_peak:
                row[peak_at:peak_at] = [
                    _report.fmt_mib(m["peak"]),
                    "-" if res is None else f"{m['peak'] / res['peak']:.3f}",
                ]
            rows.append(row)
        if all("flops" in r["lines"].get(k, {}) for k in ("rev", "rev_transitions")):
            base = r["lines"]["rev"]["flops"]["lowered_flops"]
            other = r["lines"]["rev_transitions"]["flops"]["lowered_flops"]
            on, off = (base, other) if REMAT_DEFAULT else (other, base)
            flops_rows.append(
                [rev, r["batch"], f"{off / 1e9:.1f}", f"{on / 1e9:.1f}", f"{(on / off - 1):+.1%}"]
            )
    donated = [
        f"{rev} {_report.fmt_mib(d['temp'])} MiB"
        + (f" (peak {_report.fmt_mib(d['peak'])} MiB)" if by_peak else "")
        for rev, r in results.items()
        if (d := r["lines"].get("rev", {}).get("donated")) is not None
    ]
    # A compile whose temporaries libtpu keeps out of `temp_size_in_bytes` (it reports 0) still
    # has a peak: name it, so that a 0.0 in the table is not read as no activation memory.
    unreported = [
        f"{(rev, r['twin'])[which]}, {label}: {_report.fmt_mib(m['peak'])} MiB peak, "
        f"{_report.fmt_mib(m['argument'] + m['output'])} MiB arguments + outputs"
        for rev, r in results.items()
        for key, (label, which, _) in MEMORY_LINES.items()
        if (m := r["lines"].get(key, {}).get("memory")) is not None
        and m["temp"] == 0
        and m.get("peak", 0) > m["argument"] + m["output"]
    ]
    memory = target.memory_label
    notes = [
        f"Temp MiB: compiled temporary bytes of the trainer's full train step (forward, backward, "
        f"SGD + momentum), rolled scans (`unroll=1`, what GPUs and TPUs run), compiled for "
        f"{target.description} ({memory}). Argument + output: train state in and out plus the "
        f"batch (no donation here). Compile s: trace + lower + XLA compile on this host. "
        f"Targets (H100, batch 128): RevNet-164 defaults <= 0.05x ResNet-164; "
        f"RevNet-110 / RevNet-38 temp <= 1.05.",
        "",
        aot.lower_bound_note(target),
    ]
    if by_peak:
        notes[1:1] = [
            "",
            "Peak MiB: libtpu's count of the step's device memory (`peak_memory_in_bytes`, "
            "arguments included), the figure its compile-time out-of-memory check compares with "
            "the chip's memory; temp MiB (`temp_size_in_bytes`) can exceed the chip's memory for "
            "a step libtpu compiles, so on a TPU the peak is the figure that decides what fits.",
        ]
    if donated:
        notes += [
            "",
            "Temp MiB of the defaults' step with the state donated, as the training loop and "
            "`python -m experiments.aot --target NAME --model PRESET --batch N` compile it "
            "(donation changes XLA's buffer assignment): " + ", ".join(donated) + ".",
        ]
    if unreported:
        notes += [
            "",
            "Temp 0.0: the compiler reported no temporary bytes (`temp_size_in_bytes` 0) although "
            "the program's peak (`peak_memory_in_bytes`) exceeds its arguments and outputs, so "
            "its temporaries are held where that count does not look; they need at least the peak "
            "minus arguments and outputs: " + "; ".join(unreported) + ".",
        ]
    out = [head, "", _report.markdown_table(columns, rows), "", *notes]
    if flops_rows:
        out += [
            "",
            "FLOPs of the train step with the stage-entry (transition) units stored vs "
            "recomputed in the backward: XLA's cost analysis of the unoptimised train-step HLO "
            "(`jax.jit(step).lower(...).cost_analysis()`, scans fully unrolled so that every unit "
            "counts; a rolled loop's body counts once), the program every target receives. The "
            "deviceless GPU compile itself offers no cost analysis (`Compiled.cost_analysis()` "
            "is None for the GPU targets): these are FLOPs before XLA's optimisations.",
            "",
            _report.markdown_table(
                [
                    "model",
                    "batch",
                    "GFLOP, remat_transitions=False",
                    "GFLOP, remat_transitions=True",
                    "extra",
                ],
                flops_rows,
            ),
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, measures every requested pair, writes and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds on a CPU")
    parser.add_argument("--presets", nargs="+", choices=sorted(PAIRS), help="RevNet presets")
    parser.add_argument("--batch", type=int, help="override the batch size of every preset")
    parser.add_argument("--no-time", action="store_true", help="memory only (compile only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--out", "--out-dir", dest="out", default="results", type=Path, help="output directory"
    )
    aot.add_target_arguments(parser)
    parser.add_argument(
        "--lines",
        nargs="+",
        help="with --target: only these memory lines (default all): "
        f"{' '.join(MEMORY_LINES)}",
    )
    parser.add_argument(
        "--suffix",
        default="",
        help="with --target: appended to the table's file name (bench_models_TARGET_SUFFIX.md), "
        "for a table of some presets beside the full one",
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="with --target: also FLOPs of the RevNets with transitions stored vs recomputed",
    )
    args = parser.parse_args(argv)

    if args.quick:
        pairs, base = QUICK_PAIR, QUICK_OVERRIDES
        datasets = {"tiny": QUICK_DATASET}
    else:
        pairs = {k: PAIRS[k] for k in (args.presets or PAIRS)}
        base, datasets = {}, DATASETS
    if args.target:
        target = aot.get_target(args.target)
        known = set(MEMORY_LINES)
        unknown = set(args.lines or ()) - known
        if unknown:
            raise SystemExit(f"{NAME}: unknown --lines {sorted(unknown)}; known: {sorted(known)}")
        if "res" not in (args.lines or ["res"]):
            raise SystemExit(f"{NAME}: --lines must include res (the ratios are against it)")

        def write(info: dict, results: dict, partial: bool = True) -> None:
            details = (
                "RevNet presets vs ResNet twins: compiled train-step memory"
                + (" (quick: tiny models)" if args.quick else "")
                + (" (partial: written as compiles finish)" if partial else "")
            )
            head = _report.target_header(
                NAME, details, _report.command_line(MODULE, argv), aot.describe(target, info)
            )
            name = f"{NAME}_{target.name}" + (f"_{args.suffix}" if args.suffix else "")
            _report.write_report(args.out, name, to_markdown_target(results, head, target))

        info, results = measure_on_target(pairs, datasets, base, args, on_partial=write)
        write(info, results, partial=False)
        return results
    results = {}
    for rev, (res, dataset) in pairs.items():
        size, num_classes, batch = datasets[dataset]
        batch = args.batch or batch
        print(f"{rev} / {res}: batch {batch}, {size}x{size}", flush=True)
        r = measure_pair(
            rev,
            res,
            batch=batch,
            size=size,
            num_classes=num_classes,
            base=base,
            timing=not args.no_time,
            repeats=args.repeats,
        )
        results[rev] = {**r, "twin": res, "batch": batch}

    details = "RevNet presets vs ResNet twins: train-step temp memory and step time"
    if args.quick:
        details += " (quick: tiny models)"
    head = _report.header(NAME, details, _report.command_line(MODULE, argv))
    _report.write_report(args.out, NAME, to_markdown(results, head))
    if jax.default_backend() == "cpu" and not args.quick:
        print("note: CPU figures; step-time targets refer to an accelerator", flush=True)
    return results


if __name__ == "__main__":
    main()
