"""Measurement helpers: compiled memory, device peak memory and step time.

Memory figures come from XLA itself: ``jax.jit(fn).lower(...).compile().memory_analysis()``
(deterministic, available on every backend, including CPU) and, on GPU/TPU,
``device.memory_stats()``. On CPU the compiled ``peak_memory_in_bytes`` only counts arguments and
outputs, so compare ``temp`` bytes there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = [
    "CompiledMemory",
    "compiled_memory",
    "device_peak_bytes",
    "time_fn",
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

    __getattr__ = dict.__getitem__

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
    analysis = compiled.memory_analysis()
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


def device_peak_bytes(device: jax.Device | None = None) -> int | None:
    """Peak bytes in use on ``device`` since start-up (GPU/TPU), or ``None`` where the backend
    does not report it (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats:
        return None
    for key in ("peak_bytes_in_use", "largest_alloc_size", "bytes_in_use"):
        if key in stats:
            return int(stats[key])
    return None


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
