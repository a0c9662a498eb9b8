"""What a compiled train step may take on a device: `Budget`, its memory minus a reserve."""

from __future__ import annotations

import dataclasses

from experiments.aot.targets import GiB, Target

# What a batch may use of a device's memory: the rest is kept for what a compiled program does not
# count (CUDA context, cuDNN workspaces chosen by autotuning, the TPU runtime, fragmentation).
DEFAULT_RESERVE = 0.10


@dataclasses.dataclass(frozen=True)
class Budget:
    """The bytes a compiled train step may take on a device: its memory minus a reserve.

    A compiled program fits when its total (arguments + outputs + temporaries - aliased, state
    donated as in the training loop) is at most `bytes`. The same budget decides
    ``python -m experiments.aot --batch N`` and the largest-batch search of
    ``experiments.bench_batch --target``.

    Attributes:
      memory_bytes: the device's memory.
      source: where ``memory_bytes`` comes from.
      reserve: the fraction of it kept free.
    """

    memory_bytes: float
    source: str
    reserve: float = DEFAULT_RESERVE

    @property
    def bytes(self) -> float:
        return self.memory_bytes * (1 - self.reserve)

    def describe(self) -> str:
        """``"device memory 79.6 GiB (source) minus a 10% reserve = 71.6 GiB"``."""
        return (
            f"device memory {self.memory_bytes / GiB:.1f} GiB ({self.source}) minus a "
            f"{self.reserve:.0%} reserve = {self.bytes / GiB:.2f} GiB"
        )

    def verdict(self, total: float) -> str:
        """``"fits"`` when ``total`` compiled bytes are within the budget, else
        ``"does not fit"``."""
        return "fits" if total <= self.bytes else "does not fit"


def budget_for(
    target: Target, *, reserve: float = DEFAULT_RESERVE, memory_gib: float | None = None
) -> Budget | None:
    """The `Budget` of ``target`` (``memory_gib`` replaces its memory); ``None`` when its memory is
    unknown (the ``cpu`` target) and none is given."""
    if not 0 <= reserve < 1:
        raise SystemExit(f"--reserve is a fraction of device memory in [0, 1), got {reserve}")
    if memory_gib:
        return Budget(memory_gib * GiB, "--memory-gib", reserve)
    if target.memory_bytes is None:
        return None
    return Budget(target.memory_bytes, target.memory_source, reserve)

