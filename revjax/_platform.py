"""The platform a traced program is compiled for, read by revjax's trace-time choices.

Three choices depend on the device a program will run on and are made while JAX traces it:
the default scan unroll (`revjax.default_unroll`: full on CPU, rolled on GPU and TPU), how a
fixed-point sequence isolates F and G for an exact rebuild (`_units.isolated_branch`: on CPU a
conditional that also yields the pullback's residuals, on GPU and TPU optimisation barriers),
and whether its float outputs pass through the barrier that keeps the int8 corrections
(`_carry.output_residual`: on TPU only). All follow `target_platform`: `jax.default_backend()`,
unless a program is traced inside `compiling_for`, as an ahead-of-time compile for a device the
host does not have must be (its process's default backend is the CPU).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
# JAX's platform names for GPUs, mapped onto "gpu".
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}

# Process-wide, not thread-local: the trainer traces its step in a helper thread.
_lock = threading.Lock()
_override: list[str] = []


def _normalise(platform: str) -> str:
    try:
        return _ALIASES[str(platform).lower()]
    except KeyError:
        raise ValueError(
            f"unknown platform {platform!r}; use one of {', '.join(PLATFORMS)} (or 'cuda' / "
            "'rocm' for a GPU)."
        ) from None


def target_platform() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the innermost `compiling_for`, else JAX's default
    backend."""
    if _override:
        return _override[-1]
    return _ALIASES.get(jax.default_backend(), jax.default_backend())


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[str]:
    """Traces revjax layers inside the block as for ``platform`` (``"cpu"``, ``"gpu"``/
    ``"cuda"``, ``"tpu"``).

    For ahead-of-time compiles for another device: ``with revjax.compiling_for("tpu"):
    jax.jit(step).lower(*abstract_args).compile()``. It sets the trace-time choices of
    `target_platform` (default unroll, how fixed-point F and G are isolated and their outputs
    kept); it does not choose where the program is compiled for (the arguments' shardings
    do). Read while tracing: a function traced before, outside the block, keeps its trace
    (and its choices), even passed to `jax.make_jaxpr` anew (JAX caches traces by function
    object): trace a new function object inside the block.

    Raises:
      ValueError: an unknown platform.
    """
    name = _normalise(platform)
    with _lock:
        _override.append(name)
    try:
        yield name
    finally:
        with _lock:
            _override.pop()
