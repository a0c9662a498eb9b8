"""Many compiles for one target: `compile_for_target` and `share_out` over several child
processes, and helpers for the tables built from their records."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.aot.cache import CompileCache, open_cache
from experiments.aot.compiler import TargetCompiler
from experiments.aot.targets import Target


def compile_for_target(
    target: str | Target,
    jobs: Sequence[Mapping[str, Any]],
    *,
    python: str | None = None,
    timeout: float | None = None,
    on_record: Callable[[dict], None] | None = None,
    processes: int = 1,
    cache: str | Path | CompileCache | None = None,
) -> tuple[dict, list[dict]]:
    """Compiles every job for ``target`` in child processes (`TargetCompiler`).

    Args:
      target: a `TARGETS` name or a `Target`.
      jobs: `job` dicts.
      python: the interpreter (default: `target_python`).
      timeout: seconds per compile (``None``: no limit).
      on_record: called with each record as it arrives (progress of long TPU compiles).
      processes: child processes compiling at once (XLA compiles mostly on one core).
      cache: a `CompileCache` file: jobs compiled before are answered from it.

    Returns:
      ``(info, records)``: the child's description of the target (``device_kind``, versions,
      host) and one record per job, in the order of ``jobs``: the job's fields, the compiled
      memory (``temp``, ``argument``, ``output``, ``alias``, ``total``), ``flops``,
      ``lowered_flops``, ``trace_lower_s``, ``compile_s``, ``params``; or ``error`` when that
      job failed to compile.
    """

    def handle(compiler: TargetCompiler, spec: Mapping[str, Any]) -> dict:
        record = compiler.compile(spec)
        record["target_info"] = compiler.info  # for partial reports
        return record

    def report(info: dict, record: dict, done: list) -> None:
        if on_record is not None:
            on_record(record)

    return share_out(
        target,
        jobs,
        handle,
        processes=processes,
        python=python,
        timeout=timeout,
        cache=cache,
        on_result=report,
    )


def share_out(
    target: str | Target,
    items: Sequence[Any],
    handle: Callable[[TargetCompiler, Any], Any],
    *,
    processes: int = 1,
    python: str | None = None,
    timeout: float | None = None,
    cache: str | Path | CompileCache | None = None,
    on_result: Callable[[dict, Any, list], None] | None = None,
) -> tuple[dict, list]:
    """Runs ``handle(compiler, item)`` for every item over ``processes`` `TargetCompiler`
    children, each thread taking the next item as it finishes one (a search of many compiles
    or a single compile alike).

    Args:
      target: a `TARGETS` name or a `Target`.
      items: what to handle (compile jobs, models to search).
      handle: ``(compiler, item) -> result``, run in the thread that owns ``compiler``.
      processes: child processes at once (at most one per item).
      python: the interpreter (default: `target_python`).
      timeout: seconds per compile (``None``: no limit).
      cache: a `CompileCache` (or its file) all children share.
      on_result: ``(target info, result, results so far in item order)`` after each item,
        called under a lock (partial reports).

    Returns:
      ``(info, results)``: the target's description from the first child, and one result per
      item in the order of ``items``.
    """
    pending = list(enumerate(items))
    results: list = [None] * len(pending)
    finished = [False] * len(pending)
    infos: list[dict] = []
    lock = threading.Lock()
    cache = open_cache(cache)

    def work() -> None:
        with TargetCompiler(target, python=python, timeout=timeout, cache=cache) as compiler:
            infos.append(compiler.info)
            while True:
                with lock:
                    if not pending:
                        return
                    i, item = pending.pop(0)
                result = handle(compiler, item)
                with lock:
                    results[i], finished[i] = result, True
                    if on_result is not None:
                        done = [r for r, f in zip(results, finished) if f]
                        on_result(compiler.info, result, done)

    run_in_threads(work, min(max(1, processes), max(1, len(pending))))
    return infos[0], [r for r, f in zip(results, finished) if f]


def require_compiled(records: Sequence[dict], owner: str) -> None:
    """Exits naming ``owner`` (a benchmark) and the first error when any job failed to compile
    (for tables that need every job: memory vs depth, compile times)."""
    failed = [r for r in records if "error" in r]
    if failed:
        raise SystemExit(f"{owner}: {len(failed)} compiles failed, first: {failed[0]['error']}")


def run_in_threads(work: Callable[[], None], n: int) -> None:
    """Runs ``work`` in ``n`` threads (each owns its child process); re-raises the first error."""
    if n == 1:
        work()
        return
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]



def records_by_key(records: Iterable[dict]) -> dict:
    """Records indexed by their job's ``key`` (JSON turns tuples into lists: keys are tuples)."""
    out = {}
    for r in records:
        key = r.get("key")
        out[tuple(key) if isinstance(key, list) else key] = r
    return out

