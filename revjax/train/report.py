"""What a run reports: metric records (JSON lines and TensorBoard), host memory, a progress bar,
and the compiled train-step memory of the model against its plain and twin variants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from revjax import presets
from revjax.measure import compiled_memory
from revjax.train.steps import abstract_train_step

if TYPE_CHECKING:
    from revjax.train.config import TrainConfig

__all__ = [
    "MetricWriter",
    "format_memory_report",
    "host_rss_bytes",
    "progress_bar",
    "train_step_memory",
]


class MetricWriter:
    """Writes metric records as JSON lines and TensorBoard scalars (process 0 only)."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # tensorboardX is in the experiments extra
                self._tb = None

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_py(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_py(v):
    if isinstance(v, np.ndarray | jax.Array | np.generic):
        return np.asarray(v).item()
    return v


def host_rss_bytes() -> int | None:
    """This process's resident host memory (Linux), for leak checks (experiments/bench_soak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def progress_bar(total: int, initial: int):
    """A tqdm bar on process 0 (``None`` without tqdm, which is in the experiments extra)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Memory report
# --------------------------------------------------------------------------------------------


def train_step_memory(
    config: TrainConfig, num_classes: int, in_channels: int, image_shape: tuple[int, int, int],
    batch_size: int | None = None, before_compile: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Compiled temp bytes of one train step for the model, the same model with memory saving
    off, and the twin (if configured).

    Compiles on abstract shapes; nothing runs. Scans are compiled rolled (``unroll=1``), the
    GPU/TPU configuration, so the figure is the one an accelerator sees even when measured on
    CPU (where training itself runs unrolled for speed; see `revjax.default_unroll`).
    ``before_compile`` is called before each of the (up to three) compiles: the trainer stops
    there on a signal.
    """
    rolled = {"unroll": 1}
    variants = {"model": (config.model, {**config.model_overrides, **rolled})}
    if presets.get(config.model).reversible:
        variants["model_plain"] = (
            config.model, {**config.model_overrides, **rolled, "memory_saving": False}
        )
    if config.twin_model:
        variants["twin"] = (config.twin_model, {**config.twin_overrides, **rolled})
    out = {}
    for key, (name, overrides) in variants.items():
        if before_compile is not None:
            before_compile()
        cfg = dataclasses.replace(config, model=name, model_overrides=overrides)
        step, state, batch = abstract_train_step(
            cfg, num_classes, in_channels, image_shape, batch_size
        )
        out[key] = compiled_memory(step, state, batch)["temp"]
    return out


def format_memory_report(mem: Mapping[str, int], config: TrainConfig) -> str:
    """`train_step_memory`'s figures as printed lines, in MiB and as ratios."""
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    lines = [f"Compiled train-step temporary memory (batch {config.batch_size}):"]
    lines.append(f"  {config.model} (memory saving on): {mib(mem['model'])}")
    if "model_plain" in mem:
        lines.append(
            f"  {config.model} (memory saving off): {mib(mem['model_plain'])} -> saved "
            f"{mib(mem['model_plain'] - mem['model'])} "
            f"({mem['model_plain'] / max(mem['model'], 1):.2f}x)"
        )
    if "twin" in mem:
        lines.append(
            f"  {config.twin_model} (ResNet twin): {mib(mem['twin'])} -> {config.model} uses "
            f"{mem['model'] / max(mem['twin'], 1):.2f}x its activation memory"
        )
    return "\n".join(lines)
