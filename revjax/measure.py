"""Measurement helpers: compiled memory, device peak memory and step time.

Memory figures come from XLA itself: ``jax.jit(fn).lower(...).compile().memory_analysis()``
(deterministic, available on every backend, including CPU) and, on GPU/TPU,
``device.memory_stats()``. On CPU the compiled ``peak_memory_in_bytes`` only counts arguments and
outputs, so compare ``temp`` bytes there.

Used by the trainer's metrics (`revjax.train`) and the benchmarks in ``experiments/``::

    mem = compiled_memory(jax.jit(step), abstract_state, abstract_batch)  # nothing runs
    mem.temp, mem.total                      # bytes
    device_peak_bytes()                      # None on CPU
    time_fn(step, state, batch)["median"]    # seconds
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

__all__ = [
    "CompiledMemory",
    "compiled_memory",
    "device_memory_limit_bytes",
    "device_peak_bytes",
    "is_out_of_memory",
    "time_fn",
    "time_interleaved",
]

_FIELDS = {
    "temp": "temp_size_in_bytes",
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
    "peak": "peak_memory_in_bytes",
}


class CompiledMemory(dict):
    """Byte counts of one compiled function: ``temp``, ``argument``, ``output``, ``alias``,
    ``generated_code`` and, where the backend reports it, ``peak``.

    A plain ``dict`` (JSON-serialisable) with attribute access. A field the installed jaxlib does
    not report is absent rather than zero.
    """

    def __getattr__(self, name: str) -> int:
        try:
            return self[name]
        except KeyError:  # AttributeError keeps hasattr / copy / pickle working
            raise AttributeError(
                f"{name!r} is not reported by this backend / jaxlib; present: {sorted(self)}"
            ) from None

    @property
    def total(self) -> int:
        """Bytes live at once in the worst case: arguments + outputs + temporaries - aliased."""
        return (
            self.get("argument", 0)
            + self.get("output", 0)
            + self.get("temp", 0)
            - self.get("alias", 0)
        )


def compiled_memory(fn: Callable | Any, *args: Any, **kwargs: Any) -> CompiledMemory:
    """Compiles ``fn`` for ``args`` (arrays or `jax.ShapeDtypeStruct`) and reads its memory.

    Args:
      fn: a function (jitted or not), or an already compiled / lowered object.
      *args: example arguments; nothing is executed, so abstract shapes are enough.
      **kwargs: keyword arguments for ``fn``.

    Returns:
      A `CompiledMemory` with the fields the backend reports.
    """
    compiled = fn
    if hasattr(compiled, "compile") and not hasattr(compiled, "memory_analysis"):
        compiled = compiled.compile()  # a Lowered object
    if not hasattr(compiled, "memory_analysis"):
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        compiled = jitted.lower(*args, **kwargs).compile()
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # backends without an analysis
        analysis = None
    if isinstance(analysis, list | tuple):  # older jaxlibs: one entry per device program
        analysis = analysis[0] if analysis else None
    out = CompiledMemory()
    if analysis is None:
        return out
    for key, attr in _FIELDS.items():
        value = getattr(analysis, attr, None)
        if isinstance(value, int) and value >= 0:
            out[key] = value
    return out


def _memory_stats(device: jax.Device | None) -> dict[str, Any] | None:
    """``device.memory_stats()``, or ``None`` where the backend has none (CPU) or it fails."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return stats or None


def device_peak_bytes(device: jax.Device | None = None) -> int | None:
    """Peak bytes in use on ``device`` since the process started (GPU/TPU), or ``None`` where the
    backend does not report it (CPU).

    The figure is the allocator's high-water mark (``peak_bytes_in_use``): it never goes down, so
    to measure one configuration, run it in a fresh process (or in order of growing memory).
    Other fields (``largest_alloc_size``, ``bytes_in_use``) are not peaks and are not used.
    """
    stats = _memory_stats(device)
    if stats is None or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def device_memory_limit_bytes(device: jax.Device | None = None) -> int | None:
    """Bytes the allocator may use on ``device`` (``bytes_limit``; on GPU this is
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device, 75% by default), or ``None`` (CPU)."""
    stats = _memory_stats(device)
    if stats is None or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether ``error`` is XLA running out of device memory (at compile or at run time).

    XLA reports it as ``XlaRuntimeError`` / ``JaxRuntimeError`` with a ``RESOURCE_EXHAUSTED``
    status, whose exact class has moved between jaxlib versions, so the message is checked.
    ``error`` may also be such a message as text (a compile error reported by another process).
    """
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = text.lower()
    return "resource_exhausted" in text or "out of memory" in text


def time_fn(
    fn: Callable, *args: Any, warmup: int = 2, repeats: int = 5, number: int = 1
) -> dict[str, float]:
    """Median wall time of ``fn(*args)`` in seconds, after warm-up (compilation excluded).

    Args:
      fn: a (usually jitted) function; its outputs are waited for with `jax.block_until_ready`.
      *args: its arguments.
      warmup: untimed calls first (the first one compiles).
      repeats: timed samples; the median is robust to a noisy, shared machine.
      number: calls per sample.

    Returns:
      ``{"median": s, "min": s, "compile": s}`` where ``compile`` is the first call's time.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / number)
    return {"median": statistics.median(samples), "min": min(samples), "compile": first}


def time_interleaved(
    fns: Mapping[str, tuple[Callable, Sequence[Any]]],
    *,
    warmup: int = 2,
    repeats: int = 5,
    number: int = 1,
) -> dict[str, dict[str, float]]:
    """Median wall times of several functions, sampled round-robin so they share the same load.

    On a shared machine the load drifts over seconds; timing A fully, then B, puts that drift
    into the ratio A/B. Interleaving the samples (A, B, A, B, ...) cancels most of it, which is
    what ratios such as reversible / plain need.

    Args:
      fns: ``{name: (fn, args)}``; outputs are waited for with `jax.block_until_ready`.
      warmup: untimed calls of each function first (the first one compiles).
      repeats: timed rounds; each round times every function once.
      number: calls per sample.

    Returns:
      ``{name: {"median": s, "min": s, "compile": s}}`` as `time_fn`.
    """
    first = {}
    for name, (fn, args) in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[name] = time.perf_counter() - start
        for _ in range(max(warmup - 1, 0)):
            jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / number)
    return {
        name: {"median": statistics.median(s), "min": min(s), "compile": first[name]}
        for name, s in samples.items()
    }
