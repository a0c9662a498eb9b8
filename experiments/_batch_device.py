"""`bench_batch` on a GPU/TPU: the largest power-of-two batch that trains, found by running it.

A batch "trains" when the trainer's full step (forward, backward, SGD + momentum update, state
donated as in the training loop) compiles and runs twice on the device. With ``--isolate`` (the
default on GPU/TPU) each try runs in a fresh process (`probe_worker`, started through the
command's hidden ``--probe`` option), so one try's allocations and fragmentation never decide the
next; an out-of-memory error (``RESOURCE_EXHAUSTED``, at compile or at run time) is a failure,
any other error aborts.

The search starts from an estimate instead of from 1: compiled memory (`memory_analysis()`,
arguments + outputs + temporaries) at two batch sizes gives bytes per image, which against the
allocator's limit (``bytes_limit``; ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device, 75% by
default) predicts the largest power of two. From there it doubles while tries succeed, or halves
until one does: usually two or three tries per model. Writes ``<out-dir>/bench_batch.md`` and
``.png``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax

from experiments import _report
from revjax.measure import (
    compiled_memory,
    device_memory_limit_bytes,
    device_peak_bytes,
    is_out_of_memory,
)

NAME = "bench_batch"
# The command whose hidden ``--probe MODEL BATCH`` option runs `probe_worker` in a fresh process.
WORKER_MODULE = f"experiments.{NAME}"


def largest_power_of_two(
    fits: Callable[[int], bool], start: int, max_batch: int
) -> tuple[int | None, int | None, list[tuple[int, bool]]]:
    """Searches powers of two from ``start``: doubles while ``fits``, halves until it does.

    Assumes ``fits`` is monotone (a batch that fits means every smaller one fits).

    Args:
      fits: whether a batch size trains.
      start: first batch size to try (rounded down to a power of two, at least 1).
      max_batch: never try above this (the result is then a lower bound).

    Returns:
      ``(largest, first_failure, tries)``: the largest fitting power of two (``None`` if even 1
      fails), the smallest failing one seen (``None`` if none failed, i.e. the cap was reached),
      and every ``(batch, fitted)`` in order.
    """
    batch = 2 ** int(math.floor(math.log2(max(1, min(start, max_batch)))))
    tries: list[tuple[int, bool]] = []

    def attempt(b: int) -> bool:
        ok = bool(fits(b))
        tries.append((b, ok))
        return ok

    if attempt(batch):
        while batch * 2 <= max_batch:
            if not attempt(batch * 2):
                return batch, batch * 2, tries
            batch *= 2
        return batch, None, tries
    failed = batch
    while batch > 1:
        batch //= 2
        if attempt(batch):
            return batch, failed, tries
        failed = batch
    return None, failed, tries


def try_batch(model: str, batch: int, *, size: int, overrides: dict, compiler_options=None) -> dict:
    """Compiles and runs two train steps at ``batch``; reports success or out-of-memory.

    Returns:
      ``{"batch", "ok", "total", "temp", "device_peak"}`` on success, ``{"batch", "ok": False,
      "error"}`` when the device ran out of memory.

    Raises:
      Any error that is not out-of-memory (a bug must not read as a batch that doesn't fit).
    """
    try:
        step, state, data = _report.concrete_train_step(
            model, overrides, batch_size=batch, image_size=size, donate=True
        )
        compiled = step.lower(state, data).compile(compiler_options=compiler_options)
        mem = compiled_memory(compiled)
        for _ in range(2):  # the second step sees the optimizer's momentum buffers filled
            state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
    except Exception as error:  # noqa: BLE001 - classified just below
        if not is_out_of_memory(error):
            raise
        return {"batch": batch, "ok": False, "error": str(error).splitlines()[0][:300]}
    return {
        "batch": batch,
        "ok": True,
        "total": mem.total,
        "temp": mem.get("temp"),
        "device_peak": device_peak_bytes(),
    }


def estimate_start(
    model: str, *, size: int, overrides: dict, limit: int | None, compiler_options=None
) -> tuple[int | None, float | None]:
    """Predicts the largest power-of-two batch from compiled memory at batches 32 and 64.

    Returns:
      ``(start, bytes_per_image)``; ``(None, None)`` without a known device limit.
    """
    if limit is None:
        return None, None
    totals = {}
    for b in (32, 64):
        step, state, data = _report.abstract_train_step(
            model, overrides, batch_size=b, image_size=size
        )
        compiled = step.lower(state, data).compile(compiler_options=compiler_options)
        totals[b] = compiled_memory(compiled).total
    per_image = max((totals[64] - totals[32]) / 32, 1.0)
    fixed = totals[32] - 32 * per_image
    predicted = max((limit - fixed) / per_image, 1.0)
    return 2 ** int(math.floor(math.log2(predicted))), per_image


def probe_worker(model: str, batch: int, *, size: int, overrides: dict) -> None:
    """The program of a fresh process trying one batch size: prints one JSON record."""
    record = try_batch(model, batch, size=size, overrides=overrides)
    print(json.dumps(record), flush=True)


def search_model(
    model: str, args, overrides: dict, compiler_options, limit, start_for: Callable
) -> dict:
    """Largest power-of-two batch of one model, with the tries it took; ``start_for(args.start,
    model)`` is the user's first batch (``None``: estimate it)."""
    start, per_image = estimate_start(
        model, size=args.size, overrides=overrides, limit=limit, compiler_options=compiler_options
    )
    if args.start is not None or start is None:
        start = start_for(args.start, model) or 1
    records: dict[int, dict] = {}

    def fits(batch: int) -> bool:
        if args.isolate:
            worker_args = [
                "--probe",
                model,
                str(batch),
                "--size",
                str(args.size),
                "--overrides",
                json.dumps(overrides),
            ]
            try:
                found = _report.run_json_worker(
                    WORKER_MODULE, worker_args, timeout=args.probe_timeout
                )
            except RuntimeError as error:  # a worker killed by the OOM (no JSON line)
                if not is_out_of_memory(error):
                    raise
                found = [{"batch": batch, "ok": False, "error": "out of memory (worker died)"}]
            record = found[-1]
        else:
            record = try_batch(
                model, batch, size=args.size, overrides=overrides, compiler_options=compiler_options
            )
        records[batch] = record
        print(f"  {model}: batch {batch} {'fits' if record['ok'] else 'out of memory'}", flush=True)
        return record["ok"]

    best, failed, tries = largest_power_of_two(fits, start, args.max_batch)
    params = _report.num_params(
        _report.abstract_train_step(model, overrides, batch_size=1, image_size=args.size)[1]
    )
    return {
        "model": model,
        "params": params,
        "largest": best,
        "first_failure": failed,
        "tries": tries,
        "records": records,
        "estimate": start,
        "bytes_per_image": per_image,
    }


def to_markdown(rows: list[dict], head: str) -> str:
    columns = [
        "model",
        "params",
        "largest batch",
        "first failing batch",
        "search start (estimate)",
        "compiled MiB per image",
        "device peak GiB at largest",
        "tries",
    ]
    table = []
    for r in rows:
        best = r["largest"]
        rec = r["records"].get(best, {}) if best else {}
        peak = rec.get("device_peak")
        table.append(
            [
                r["model"],
                f"{r['params']:,}",
                "-" if best is None else f"{best:,}",
                "none up to the cap" if r["first_failure"] is None else f"{r['first_failure']:,}",
                f"{r['estimate']:,}",
                "-" if r["bytes_per_image"] is None else f"{r['bytes_per_image'] / 2**20:.2f}",
                "-" if peak is None else f"{peak / 2**30:.2f}",
                ", ".join(f"{b}{'' if ok else ' (OOM)'}" for b, ok in r["tries"]),
            ]
        )
    lines = [head, "", _report.markdown_table(columns, table), ""]
    if len(rows) == 2 and rows[0]["largest"] and rows[1]["largest"]:
        a, b = rows
        capped = (
            " (lower bound: the search cap was reached)"
            if (a["first_failure"] is None or b["first_failure"] is None)
            else ""
        )
        lines.append(
            f"- largest batch {a['model']} / {b['model']}: "
            f"{a['largest'] / b['largest']:.1f}x{capped}."
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, limit: int | None) -> Path:
    """Compiled memory (arguments + outputs + temporaries) of each successful try vs batch."""
    series = {}
    for r in rows:
        ok = sorted(b for b, rec in r["records"].items() if rec["ok"])
        series[r["model"]] = (ok, [r["records"][b]["total"] / 2**30 for b in ok])
    if limit is not None:
        xs = sorted({b for _, (bs, _) in series.items() for b in bs})
        if xs:
            series["allocator limit"] = (xs, [limit / 2**30] * len(xs))
    return _report.plot_lines(
        path, series, title=title, xlabel="batch size", ylabel="compiled memory, GiB"
    )


def run(args, *, command: str, start_for: Callable) -> list[dict]:
    """The search on this machine's device for the parsed ``args``; writes the table and plot.

    Args:
      args: `experiments.bench_batch`'s parsed options.
      command: the command line, for the table's header.
      start_for: ``start_for(args.start, model)``, the ``--start`` batch for one model or
        ``None``.
    """
    backend = _report.require_accelerator(NAME, allow_cpu=args.allow_cpu)
    on_cpu = backend == "cpu"
    if args.isolate is None:
        args.isolate = not on_cpu
    if args.quick:
        models = args.models or ["revnet_tiny", "resnet_tiny"]
        overrides = {"units_per_stage": (1,), "widths": (4, 8)}
        args.max_batch = args.max_batch or 4
        args.start = args.start or [(None, 4)]  # one try per model: the search is tested on its own
    else:
        models = args.models or ["revnet164", "resnet164"]
        overrides = {}
        args.max_batch = args.max_batch or 2**20
    # On CPU only the search logic is exercised: compile fast (same memory figures).
    options = _report.CPU_MEMORY_COMPILER_OPTIONS if on_cpu else None
    limit = device_memory_limit_bytes()
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "default 0.75")
    head = _report.header(
        "Largest power-of-two batch",
        f"trainer's train step (state donated, two steps), {args.size}x{args.size}, float32, "
        f"default scan unroll; allocator limit "
        f"{'unknown (CPU: capped at --max-batch)' if limit is None else f'{limit / 2**30:.1f} GiB'}"
        f" (XLA_PYTHON_CLIENT_MEM_FRACTION {fraction}); "
        f"{'each try in a fresh process' if args.isolate else 'tries in this process'}"
        + (f"; {overrides}" if overrides else ""),
        command,
    )
    print(head, flush=True)
    rows = [search_model(m, args, overrides, options, limit, start_for) for m in models]
    text = to_markdown(rows, head)
    _report.write_report(args.out_dir, NAME, text)
    png = plot(
        rows,
        args.out_dir / f"{NAME}.png",
        f"Train-step memory vs batch, {args.size}x{args.size}",
        limit,
    )
    print(f"wrote {png}")
    return rows
