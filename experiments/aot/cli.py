"""`python -m experiments.aot`: one compile for a target, with a fits / does-not-fit verdict
against its `Budget`; and the ``--target`` options the benchmarks share."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import experiments.aot as package
from experiments.aot.budgets import DEFAULT_RESERVE, Budget, budget_for
from experiments.aot.child import child_main
from experiments.aot.compiler import job
from experiments.aot.pool import compile_for_target
from experiments.aot.targets import TARGETS, GiB, Target, describe, get_target


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target`` and ``--aot-python`` for the benchmarks."""
    parser.add_argument(
        "--target",
        choices=list(TARGETS),
        default=None,
        help="compile ahead of time for this device instead of measuring this host "
        "(experiments.aot; nothing runs)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="with --target: child processes compiling at once (default 1)",
    )
    parser.add_argument(
        "--aot-python",
        default=None,
        help="interpreter with the target's JAX plugin (default: $REVJAX_AOT_<CUDA|TPU>_PYTHON, "
        "else .venv-aot-<cuda|tpu>)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --target: reuse compile records from this JSON-lines file and add new ones "
        "(same job, target, versions and revjax sources only); reruns and interrupted searches "
        "then skip what was compiled",
    )


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--reserve`` and ``--memory-gib``: the `Budget` a compiled step is held against."""
    parser.add_argument(
        "--reserve",
        type=float,
        default=DEFAULT_RESERVE,
        help="with --target: fraction of device memory kept free (CUDA context, cuDNN "
        f"workspace, fragmentation; default {DEFAULT_RESERVE:.2f})",
    )
    parser.add_argument(
        "--memory-gib", type=float, default=None, help="with --target: override device memory"
    )


def print_record(record: Mapping[str, Any], target: Target) -> None:
    """The compiled bytes of ``--batch N`` (MiB), FLOPs where reported, compile time; on a TPU
    also libtpu's peak, the count its compile-time out-of-memory check uses."""
    for field in ("temp", "argument", "output", "alias", "total"):
        print(f"{field:>9s}: {record[field] / 2**20:10.1f} MiB")
    if target.platform == "tpu" and "peak" in record:
        print(f"{'peak':>9s}: {record['peak'] / 2**20:10.1f} MiB (libtpu's count)")
    if record.get("flops") is not None:
        print(f"    flops: {record['flops']:.4g} (a rolled loop's body counts once)")
    print(
        f"  compile: {record['trace_lower_s']:.1f} s trace + lower, "
        f"{record.get('compile_s', 0):.1f} s"
    )


def print_verdict(record: Mapping[str, Any], budget: Budget | None, target: Target) -> None:
    """The last line of ``--batch N``: whether the compiled step fits ``budget``."""
    if budget is None:
        print(
            f"no verdict: target {target.name!r} has no device memory to budget against; pass "
            "--memory-gib (or pick a GPU/TPU target)"
        )
        return
    if "error" in record:  # the compiler itself ran out of the target's memory
        print(f"does not fit: the compile ran out of memory; budget: {budget.describe()}")
        return
    print(
        f"{budget.verdict(record['total'])}: {record['total'] / GiB:.2f} GiB compiled "
        f"(arguments + outputs + temporaries - aliased) against {budget.describe()}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=package.__doc__.splitlines()[0])
    parser.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="list the known targets")
    add_target_arguments(parser)
    add_budget_arguments(parser)
    parser.add_argument("--model", default="revnet164", help="a revjax.models preset")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--overrides", default="{}", help="constructor arguments as JSON (unroll defaults to 1)"
    )
    parser.add_argument(
        "--donate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="donate the train state as the training loop does (default; the fits verdict "
        "assumes it)",
    )
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    if args.list or not args.target:
        for t in TARGETS.values():
            print(f"{t.name:8s} {t.description}; memory {t.memory_label} ({t.memory_source})")
        return
    target = get_target(args.target)
    budget = budget_for(target, reserve=args.reserve, memory_gib=args.memory_gib)
    info, (record,) = compile_for_target(
        target,
        [
            job(
                args.model,
                json.loads(args.overrides),
                batch=args.batch,
                size=args.size,
                num_classes=args.num_classes,
                donate=args.donate,
            )
        ],
        python=args.aot_python,
        cache=args.cache,
    )
    print(describe(target, info))
    if "error" in record:
        from revjax.measure import is_out_of_memory

        if not is_out_of_memory(record["error"]):
            raise SystemExit(record["error"])
        print(record["error"].splitlines()[0][:300])
    else:
        print_record(record, target)
    print_verdict(record, budget, target)

