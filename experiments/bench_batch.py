"""Benchmark 5, largest batch: the most images a model trains on at once, RevNet vs ResNet.

The largest batch of RevNet-164 and ResNet-164 (or ``--models``) whose train step fits in device
memory, and their ratio.

One command, two programs, chosen by ``--target``:

- on this machine's GPU/TPU (`experiments._batch_device`): runs the trainer's step at
  power-of-two batch sizes, each try in a fresh process, from a start estimated from compiled
  memory. Refuses to run on CPU (where nothing runs out of memory) unless ``--allow-cpu``; there
  the search stops at ``--max-batch``. Writes ``<out-dir>/bench_batch.md`` and ``.png``.
- ``--target NAME`` (`experiments._batch_target`): simulates the search for a GPU/TPU this host
  does not have by compiling the step ahead of time at candidate batch sizes (nothing runs),
  and reports the largest multiple of ``--multiple`` within the target's budget, into
  ``bench_batch_<target>.md`` / ``.png``.

    python -m experiments.bench_batch                                  # RevNet-164 vs ResNet-164
    python -m experiments.bench_batch --models revnet110 resnet110
    python -m experiments.bench_batch --allow-cpu --quick              # CI: tiny models, CPU
    python -m experiments.bench_batch --target h100                    # simulated, no GPU needed
"""

from __future__ import annotations

import os

# The parent process only compiles; it must not reserve 75% of the device before its workers.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from experiments import _batch_device, _batch_target, _report, aot  # noqa: E402

NAME = "bench_batch"
MODULE = f"experiments.{NAME}"


def parse_start(item: str) -> tuple[str | None, int]:
    """``"4600"`` -> ``(None, 4600)``; ``"revnet164:downsample=invertible=4600"`` -> that model
    spec and 4600."""
    spec, eq, value = item.rpartition("=")
    try:
        return (spec if eq else None), int(value)
    except ValueError:
        message = f"expected N or MODEL=N (an integer), got {item!r}"
        raise argparse.ArgumentTypeError(message) from None


def start_for(starts, spec: str) -> int | None:
    """The ``--start`` batch for one model spec: its own, else the global one, else None."""
    starts = dict(starts or [])
    return starts.get(spec, starts.get(None))


def build_parser() -> argparse.ArgumentParser:
    """The options of both programs (``--target`` picks one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and sizes (with --allow-cpu, for CI)"
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="presets to search (default revnet164 resnet164)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side (default 32)")
    parser.add_argument(
        "--start",
        nargs="+",
        type=parse_start,
        default=None,
        metavar="[MODEL=]N",
        help="first batch to try: N for every model, MODEL=N for one (with --target; a start "
        "near the answer saves compiles: default 128, 32 at 224x224). Without --target: N only, "
        "default estimated from compiled memory",
    )
    parser.add_argument("--max-batch", type=int, default=None, help="search cap (default 2^20)")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on CPU anyway (tests; nothing runs out of memory there)",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each try in a fresh process (default: on GPU/TPU)",
    )
    parser.add_argument(
        "--probe-timeout", type=float, default=300.0, help="seconds per try's worker process"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    aot.add_target_arguments(parser)
    aot.add_budget_arguments(parser)
    parser.add_argument(
        "--multiple", type=int, default=8, help="with --target: batch granularity (default 8)"
    )
    parser.add_argument(
        "--max-compiles",
        type=int,
        default=8,
        help="with --target: compiles per model at most (default 8; TPU compiles take minutes)",
    )
    return parser


def main(argv=None):
    """Parses ``argv`` and runs the search it asks for: one try (the hidden ``--probe``, in a
    worker process), the search on this machine's device, or the one compiled for ``--target``."""
    args = build_parser().parse_args(argv)
    if args.size is None and not args.target:  # with --target each preset has its own size
        args.size = 8 if args.quick else 32
    if args.probe:
        model, batch = args.probe
        overrides = json.loads(args.overrides)
        _batch_device.probe_worker(model, int(batch), size=args.size, overrides=overrides)
        return None
    command = _report.command_line(MODULE, argv)
    program = _batch_target if args.target else _batch_device
    return program.run(args, command=command, start_for=start_for)


if __name__ == "__main__":
    main()
