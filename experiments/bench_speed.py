"""Benchmark 3, speed: train-step time of reversible vs plain backprop, vs the ResNet twin, and
compile time against depth.

For each RevNet preset (default RevNet-38, -110, -164 on CIFAR-sized input, batch 128) and its
ResNet twin (ResNet-32, -110, -164), runs the trainer's full train step (forward, backward,
SGD + momentum update) in three variants:

- ``reversible``: the RevNet with memory saving on (activations rebuilt in the backward),
- ``plain``: the same RevNet, same parameters, with plain autodiff (memory saving off),
- ``twin``: the ResNet twin,

and reports the median step time after warm-up, with the three variants' samples interleaved
(round-robin) so that the ratios reversible / plain and reversible / twin are measured side by
side under the same load, and the compile time (trace + lower + XLA compile) of each. Scans use
the backend's default unroll: rolled on GPU/TPU (compile time independent of depth), fully
unrolled on CPU (rolled conv gradients are many times slower there, jax-ml/jax#12868), so on CPU
compile time grows with depth by design.

Targets (GPU, rolled scans): reversible / plain <= 1.30; compile time of RevNet-164 <= 1.5x
that of RevNet-38.

    python -m experiments.bench_speed                                  # 38 / 110 / 164
    python -m experiments.bench_speed --models revnet38 revnet110 --batch 32
    python -m experiments.bench_speed --quick                          # seconds, for CI
    python -m experiments.bench_speed --target h100                    # compile time, H100

``--target NAME`` measures compile time only (trace + lower + XLA compile, rolled scans), for a
GPU/TPU compiled ahead of time on this host (`experiments.aot`), and writes
``bench_speed_<target>.md`` / ``.png``.

Writes ``<out-dir>/bench_speed.md`` and ``<out-dir>/bench_speed.png``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax

from experiments import _report, aot
from revjax import presets
from revjax.measure import time_interleaved
from revjax.models import RevNet

NAME = "bench_speed"
MODULE = f"experiments.{NAME}"

VARIANTS = ("reversible", "plain", "twin")


@dataclass(frozen=True)
class Entry:
    """One row: a RevNet preset (with overrides) and its ResNet twin at a nominal depth."""

    label: str
    revnet: str
    twin: str
    depth: int
    overrides: dict = field(default_factory=dict)


def preset_entry(name: str) -> Entry:
    """The entry of a RevNet preset name; its depth is the number in the name."""
    twins = {r: t for r, t in presets.twins().items() if presets.get(r).cls is RevNet}
    if name not in twins:
        raise SystemExit(f"{NAME}: no ResNet twin known for {name!r}; use one of {list(twins)}")
    digits = re.findall(r"\d+", name)
    return Entry(name, name, twins[name], int(digits[0]) if digits else 0)


# Two depths of a one-stage tiny model (1 and 2 units) so that the quick run also exercises the
# compile-time-against-depth row; depth = 2 convs x 2 functions x units x stages + 2 layers.
QUICK_ENTRIES = [
    Entry(
        f"revnet_tiny, 1 stage of {n} unit{'s' * (n > 1)}",
        "revnet_tiny",
        "resnet_tiny",
        4 * n + 2,
        {"units_per_stage": (n,), "widths": (4, 8)},
    )
    for n in (1, 2)
]


def _variant(entry: Entry, variant: str) -> tuple[str, dict]:
    if variant == "twin":
        return entry.twin, dict(entry.overrides)
    return entry.revnet, {**entry.overrides, "memory_saving": variant == "reversible"}


def measure_entry(
    entry: Entry, *, batch: int, size: int, warmup: int, repeats: int, compiler_options=None
) -> dict:
    """Compile time, step time and parameter count of each variant of one entry."""
    compiled, compile_s, params = {}, {}, {}
    for variant in VARIANTS:
        model, overrides = _variant(entry, variant)
        step, state, data = _report.concrete_train_step(
            model, overrides, batch_size=batch, image_size=size
        )
        start = time.perf_counter()
        # trace + lower + compile; calling the Compiled object never retraces
        fn = step.lower(state, data).compile(compiler_options=compiler_options)
        compile_s[variant] = time.perf_counter() - start
        compiled[variant] = (fn, (state, data))
        params[variant] = _report.num_params(state)
        print(f"  {entry.label}, {variant}: compiled in {compile_s[variant]:.1f} s", flush=True)
    times = time_interleaved(compiled, warmup=warmup, repeats=repeats)
    return {
        "label": entry.label,
        "depth": entry.depth,
        "twin": entry.twin,
        **{f"compile_{v}": compile_s[v] for v in VARIANTS},
        **{f"time_{v}": times[v]["median"] for v in VARIANTS},
        **{f"params_{v}": params[v] for v in VARIANTS},
    }


def to_markdown(rows: list[dict], head: str) -> str:
    columns = [
        "model",
        "twin",
        "params",
        "twin params",
        "step ms reversible",
        "plain",
        "twin",
        "reversible / plain",
        "reversible / twin",
        "compile s reversible",
        "plain",
        "twin",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r["label"],
                r["twin"],
                f"{r['params_reversible']:,}",
                f"{r['params_twin']:,}",
                _report.fmt_ms(r["time_reversible"]),
                _report.fmt_ms(r["time_plain"]),
                _report.fmt_ms(r["time_twin"]),
                f"{r['time_reversible'] / r['time_plain']:.2f}",
                f"{r['time_reversible'] / r['time_twin']:.2f}",
                f"{r['compile_reversible']:.1f}",
                f"{r['compile_plain']:.1f}",
                f"{r['compile_twin']:.1f}",
            ]
        )
    lines = [head, "", _report.markdown_table(columns, table), ""]
    ratio = lambda r: r["time_reversible"] / r["time_plain"]
    worst = max(rows, key=ratio)
    lines.append(
        f"- reversible / plain step time: worst {ratio(worst):.2f} ({worst['label']}); "
        "target <= 1.30."
    )
    if len(rows) > 1:
        shallow, deep = min(rows, key=lambda r: r["depth"]), max(rows, key=lambda r: r["depth"])
        ratio = deep["compile_reversible"] / shallow["compile_reversible"]
        lines.append(
            f"- compile time {deep['label']} / {shallow['label']} (reversible): {ratio:.2f}; "
            "target <= 1.5 on GPU with rolled scans"
            + (
                " (not applicable here: CPU scans are unrolled)."
                if jax.default_backend() == "cpu"
                else "."
            )
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    depths = [r["depth"] for r in rows]
    series = {v: (depths, [r[f"compile_{v}"] for r in rows]) for v in VARIANTS}
    return _report.plot_lines(
        path, series, title=title, xlabel="RevNet depth (layers)", ylabel="compile time, s"
    )


def compile_on_target(entries, *, batch: int, size: int, repeats: int, args) -> tuple[dict, list]:
    """Compile time (trace + lower + XLA compile, rolled scans) of every variant of every entry
    for ``args.target``, in one child process; ``repeats`` rounds, interleaved, median."""
    jobs = [
        aot.job(*_variant(e, v), batch=batch, size=size, key=[e.label, v, i])
        for i in range(repeats)
        for e in entries
        for v in VARIANTS
    ]

    def progress(r: dict) -> None:
        label, variant, i = r["key"]
        what = (
            r["error"][:200]
            if "error" in r
            else f"{r['trace_lower_s']:.1f} s trace + lower, {r['compile_s']:.1f} s compile"
        )
        print(f"  {label}, {variant} (round {i + 1}): {what}", flush=True)

    info, records = aot.compile_for_target(
        args.target, jobs, python=args.aot_python, on_record=progress, processes=args.processes
    )
    aot.require_compiled(records, NAME)
    rows = []
    for e in entries:
        row = {"label": e.label, "depth": e.depth, "twin": e.twin}
        for v in VARIANTS:
            mine = [r for r in records if r["key"][:2] == [e.label, v]]
            row[f"compile_{v}"] = statistics.median(
                r["trace_lower_s"] + r["compile_s"] for r in mine
            )
            row[f"xla_{v}"] = statistics.median(r["compile_s"] for r in mine)
            row[f"params_{v}"] = mine[0]["params"]
        rows.append(row)
    return info, rows


def to_markdown_target(rows: list[dict], head: str) -> str:
    columns = ["model", "twin", "params", "compile s reversible", "plain", "twin"]
    columns += ["XLA compile s reversible", "plain", "twin"]
    table = [
        [r["label"], r["twin"], f"{r['params_reversible']:,}"]
        + [f"{r[f'compile_{v}']:.1f}" for v in VARIANTS]
        + [f"{r[f'xla_{v}']:.1f}" for v in VARIANTS]
        for r in rows
    ]
    lines = [head, "", _report.markdown_table(columns, table), ""]
    shallow = min(rows, key=lambda r: r["depth"])
    for deep in sorted(rows, key=lambda r: r["depth"]):
        if deep is shallow:
            continue
        ratio = deep["compile_reversible"] / shallow["compile_reversible"]
        lines.append(
            f"- compile time {deep['label']} / {shallow['label']} (reversible, rolled): {ratio:.2f}"
        )
    lines += [
        "",
        "Compile s: trace + lower + XLA compile for the target on this host (medians of the "
        "interleaved rounds; a busy host inflates all of them alike). Target: "
        "RevNet-110 / RevNet-38 compile time <= 1.2x. No step time: nothing runs.",
    ]
    return "\n".join(lines)


def _main_target(args, entries, batch: int, size: int, argv) -> list:
    target = aot.get_target(args.target)
    repeats = args.repeats or 3
    info, rows = compile_on_target(entries, batch=batch, size=size, repeats=repeats, args=args)
    head = _report.target_header(
        "Train-step compile time",
        f"full train step (forward, backward, SGD + momentum), batch {batch}, {size}x{size}, "
        f"float32, rolled scans (unroll=1); median of {repeats} interleaved rounds",
        _report.command_line(MODULE, argv),
        aot.describe(target, info),
    )
    name = f"{NAME}_{target.name}"
    _report.write_report(args.out_dir, name, to_markdown_target(rows, head))
    png = plot(
        rows,
        args.out_dir / f"{name}.png",
        f"Compile time vs depth, {target.description}, batch {batch}, {size}x{size}",
    )
    print(f"wrote {png}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="RevNet presets (default revnet38 revnet110 revnet164)",
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side (square)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument(
        "--fast-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="XLA:CPU backend optimisation level 0 (default: with --quick only; "
        "compiles faster, runs slower)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    aot.add_target_arguments(parser)
    args = parser.parse_args(argv)
    fast = args.quick if args.fast_compile is None else args.fast_compile
    on_cpu = jax.default_backend() == "cpu"
    options = _report.CPU_MEMORY_COMPILER_OPTIONS if fast and on_cpu else None
    if args.quick:
        entries, batch, size, repeats = QUICK_ENTRIES, 2, 8, 2
    else:
        entries, batch, size, repeats = None, 128, 32, 7
    if args.models is not None:
        entries = [preset_entry(m) for m in args.models]
    entries = entries or [preset_entry(m) for m in ("revnet38", "revnet110", "revnet164")]
    batch = args.batch or batch
    size = args.size or size
    if args.target:
        if args.cache is not None:
            raise SystemExit(
                f"{NAME}: --cache would report earlier runs' compile times as this run's; "
                "bench_speed compiles every time (drop --cache)"
            )
        return _main_target(args, entries, batch, size, argv)
    repeats = args.repeats or repeats

    head = _report.header(
        "Train-step speed",
        f"full train step (forward, backward, SGD + momentum), batch {batch}, {size}x{size}, "
        f"float32; median of {repeats} interleaved rounds after {args.warmup} warm-up calls; "
        "compile = trace + lower + XLA compile; scans at the backend's default unroll "
        f"({'fully unrolled on CPU' if jax.default_backend() == 'cpu' else 'rolled'})"
        + (
            "; XLA:CPU backend optimisation level 0 (smoke test: times not representative)"
            if options
            else ""
        ),
        _report.command_line(MODULE, argv),
    )
    print(head, flush=True)
    rows = [
        measure_entry(
            e, batch=batch, size=size, warmup=args.warmup, repeats=repeats, compiler_options=options
        )
        for e in entries
    ]
    text = to_markdown(rows, head)
    _report.write_report(args.out_dir, NAME, text)
    png = plot(
        rows, args.out_dir / f"{NAME}.png", f"Compile time vs depth, batch {batch}, {size}x{size}"
    )
    print(f"wrote {png}")
    return rows


if __name__ == "__main__":
    main()
