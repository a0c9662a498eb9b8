"""Soak benchmark: a few thousand steps of the digits job; host memory and step time stay flat.

Runs the real trainer (`revjax.train.train_and_evaluate`: input pipeline, periodic evaluation,
checkpoints, metrics) and reads its metrics records: every ``--log-every`` steps each record
carries the process's resident host memory (``host_rss_bytes``) and the window's throughput.
After warm-up (compilation, first checkpoint and evaluation, allocator growth) it reports RSS
at the start and the end, the growth, the least-squares slope (MiB per 1,000 steps), and the
median step time of the first and the last quarter of the records.

    python -m experiments.bench_soak                        # digits job (RevNet-38), 3,000 steps
    python -m experiments.bench_soak --model revnet_tiny --batch-size 16 --steps 3000
    python -m experiments.bench_soak --quick                # CI smoke: 40 steps, tiny model

Target: RSS growth after warm-up <= 5 %. Step-time windows that hold an evaluation or a
checkpoint are slower; the medians ignore them. Writes ``<out-dir>/bench_soak.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from experiments import _report
from experiments.train import load_config
from revjax import train

NAME = "bench_soak"
MODULE = f"experiments.{NAME}"
TARGET_RSS_GROWTH = 0.05


def soak_config(args: argparse.Namespace) -> train.TrainConfig:
    config = load_config("digits")
    changes = dict(
        num_steps=args.steps,
        lr_boundaries=(args.steps * 5 // 8, args.steps * 7 // 8),  # the digits recipe's shape
        log_every=args.log_every,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        memory_report=False,
    )
    if args.model:
        changes.update(model=args.model, model_overrides={}, twin_model=None)
    if args.batch_size:
        changes.update(batch_size=args.batch_size, eval_batch_size=100)
    return dataclasses.replace(config, **changes)


def summarize(records: list[dict], batch_size: int, warmup_steps: int) -> dict:
    """RSS growth and step-time drift from the trainer's train-metric records."""
    rows = [r for r in records if "train_loss" in r and "host_rss_bytes" in r]
    after = [r for r in rows if r["step"] > warmup_steps]
    if len(after) < 4:
        raise ValueError(f"need >= 4 records after warm-up step {warmup_steps}, got {len(after)}")
    steps = [r["step"] for r in after]
    rss = [r["host_rss_bytes"] for r in after]
    step_ms = [batch_size / r["images_per_second"] * 1e3 for r in after]
    quarter = max(len(after) // 4, 1)
    first, last = statistics.median(step_ms[:quarter]), statistics.median(step_ms[-quarter:])
    return {
        "steps": rows[-1]["step"],
        "warmup_steps": warmup_steps,
        "rss_start": rss[0],
        "rss_end": rss[-1],
        "rss_max": max(rss),
        "rss_growth": rss[-1] / rss[0] - 1.0,
        "rss_slope_per_1k": _report.fit_slope(steps, rss) * 1000,
        "step_ms_first": first,
        "step_ms_last": last,
        "series": {"step": [r["step"] for r in rows], "rss": [r["host_rss_bytes"] for r in rows]},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--model", default=None, help="preset (default: the digits config's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="fraction of steps skipped (at least up to the first eval and "
                        "checkpoint)")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--quick", action="store_true", help="40 steps of the tiny RevNet")
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.model, args.batch_size = 40, "revnet_tiny", 16
        args.log_every, args.eval_every, args.checkpoint_every = 4, 20, 20
    config = soak_config(args)
    # Warm-up ends after the first evaluation and checkpoint (their compilation and buffers).
    firsts = [n for n in (args.eval_every, args.checkpoint_every) if 0 < n < args.steps]
    warmup_steps = max([int(args.steps * args.warmup), args.log_every, *firsts])

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        train.train_and_evaluate(config, workdir)
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    out = summarize(records, config.batch_size, warmup_steps)

    details = (
        f"the trainer on digits, {config.model} batch {config.batch_size}, {out['steps']} steps, "
        f"eval every {config.eval_every}, checkpoint every {config.checkpoint_every}, metrics "
        f"every {config.log_every}; after warm-up (step > {warmup_steps}): host RSS "
        "(/proc/self/statm) and median step time of the first / last quarter of the windows"
    )
    table = _report.markdown_table(
        ["steps", "RSS MiB after warm-up", "RSS MiB at end", "RSS max MiB", "RSS growth",
         "RSS slope MiB / 1k steps", "step ms first quarter", "step ms last quarter",
         "last / first"],
        [[out["steps"], _report.fmt_mib(out["rss_start"]), _report.fmt_mib(out["rss_end"]),
          _report.fmt_mib(out["rss_max"]), f"{out['rss_growth'] * 100:+.2f} %",
          f"{out['rss_slope_per_1k'] / 2**20:+.2f}", f"{out['step_ms_first']:.1f}",
          f"{out['step_ms_last']:.1f}", f"{out['step_ms_last'] / out['step_ms_first']:.2f}"]],
    )
    met = "met" if out["rss_growth"] <= TARGET_RSS_GROWTH else "NOT met"
    verdict = (
        f"RSS growth after warm-up: {out['rss_growth'] * 100:+.2f} % (target <= "
        f"{TARGET_RSS_GROWTH * 100:.0f} %: {met})."
    )
    command = _report.command_line(MODULE, argv)
    text = "\n\n".join([_report.header("Soak", details, command), table, verdict])
    _report.write_report(Path(args.out_dir), NAME, text)
    series = out.pop("series")
    _report.plot_lines(
        Path(args.out_dir) / f"{NAME}.png",
        {"host RSS (MiB)": (series["step"], [b / 2**20 for b in series["rss"]])},
        title=f"Soak: host RSS over {out['steps']} steps ({config.model}, digits)",
        xlabel="step",
        ylabel="MiB",
    )
    return out


if __name__ == "__main__":
    main()
