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
unroll). Targets (issue 3): RevNet-164 at most 0.10x the ResNet-164 temp memory, reversible
step time at most 1.30x plain.

    python -m experiments.bench_models                              # all presets (accelerator)
    python -m experiments.bench_models --presets revnet38 --batch 32  # one pair, smaller batch
    python -m experiments.bench_models --quick                      # seconds, tiny models, CPU
    python -m experiments.bench_models --no-time                    # memory only (compile only)

Writes ``<out-dir>/bench_models.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from experiments import _report
from revjax.measure import time_interleaved

NAME = "bench_models"
MODULE = f"experiments.{NAME}"

# RevNet preset -> (ResNet twin, dataset: (image size, classes, default batch))
PAIRS = {
    "revnet38": ("resnet32", "cifar"),
    "revnet110": ("resnet110", "cifar"),
    "revnet164": ("resnet164", "cifar"),
    "revnet56": ("resnet50", "imagenet"),
    "revnet104": ("resnet101", "imagenet"),
}
DATASETS = {"cifar": (32, 10, 128), "imagenet": (224, 1000, 32)}

# Memory columns: (label, which model of the pair, constructor overrides)
MEMORY_LINES = {
    "rev": ("RevNet", 0, {}),
    "rev_plain": ("RevNet, saving off", 0, {"memory_saving": False}),
    "rev_store": ("RevNet, stored transitions", 0, {"remat_transitions": False}),
    "rev_inv": ("RevNet, invertible downsampling", 0, {"downsample": "invertible"}),
    "res": ("ResNet twin", 1, {}),
    "res_ckpt": ("ResNet, checkpoint per unit", 1, {"remat_units": True}),
}

# --quick: the tiny test models, shrunk further so that the whole run takes seconds on a CPU.
QUICK_PAIR = {"revnet_tiny": ("resnet_tiny", "tiny")}
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
    args = parser.parse_args(argv)

    if args.quick:
        pairs, base = QUICK_PAIR, QUICK_OVERRIDES
        datasets = {"tiny": QUICK_DATASET}
    else:
        pairs = {k: PAIRS[k] for k in (args.presets or PAIRS)}
        base, datasets = {}, DATASETS
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
