"""Shared plumbing of the benchmarks: headers, Markdown tables, PNG plots, fits and train steps.

Every benchmark in ``experiments/`` writes ``<out-dir>/<name>.md`` (a header line, then Markdown
tables) and, where it has a plot, ``<out-dir>/<name>.png``, and prints the table. The header line
names the hardware, the date, the jax version and the exact command, so a table read later says
where it came from (`header`).

Train steps are built exactly as the trainer builds them (`revjax.train.create_train_state` and
`revjax.train.make_train_step`: SGD + momentum, masked weight decay, BatchNorm statistics), so a
benchmark measures what training runs. `abstract_train_step` compiles on shapes only (nothing is
allocated), `concrete_train_step` builds real arrays for timing and device-peak runs.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from revjax import train
from revjax.measure import CompiledMemory, compiled_memory
from revjax.train.steps import abstract_train_step as abstract_train_step_of

__all__ = [
    "CPU_MEMORY_COMPILER_OPTIONS",
    "abstract_train_step",
    "byte_unit",
    "command_line",
    "compiled_step_memory",
    "concrete_train_step",
    "fit_slope",
    "fmt_mib",
    "fmt_ms",
    "hardware_label",
    "header",
    "markdown_table",
    "num_params",
    "plot_lines",
    "target_header",
    "require_accelerator",
    "run_json_worker",
    "write_report",
]

# XLA:CPU spends most of its compile time in LLVM code generation, which happens after buffer
# assignment and so cannot change `memory_analysis()`. Compiling with backend optimisation
# level 0 gives identical temp/argument/output bytes in a fraction of the time; only used where
# the compiled code is not run.
CPU_MEMORY_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


# --------------------------------------------------------------------------------------------
# Header, tables, plots
# --------------------------------------------------------------------------------------------


def hardware_label() -> str:
    """``"gpu (NVIDIA H200), 16 host cores, x86_64"``: backend, device kind, host cores."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    count = jax.device_count()
    devices = f"{count} x " if count > 1 and dev.platform != "cpu" else ""
    return f"{dev.platform} ({devices}{kind}), {os.cpu_count()} host cores, {platform.machine()}"


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The exact command that reproduces a run: ``python -m <module> <args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", module, *args])


def header(title: str, details: str, command: str) -> str:
    """One line: what, when, where, with what, and how to rerun it."""
    return (
        f"{title} ({datetime.date.today()}, {hardware_label()}, jax {jax.__version__}): "
        f"{details}; `{command}`"
    )


def target_header(title: str, details: str, command: str, target: str) -> str:
    """As `header`, for a program compiled ahead of time for another device (`experiments.aot`):
    ``target`` names the device, the versions and this host."""
    return f"{title} ({datetime.date.today()}, {target}): {details}; `{command}`"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned (numbers)."""
    align = ["---"] + ["---:"] * (len(columns) - 1)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row} has {len(row)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_mib(nbytes: float | None, digits: int = 1) -> str:
    """Bytes as MiB, ``-`` for a missing figure."""
    if nbytes is None or (isinstance(nbytes, float) and math.isnan(nbytes)):
        return "-"
    return f"{nbytes / 2**20:.{digits}f}"


def byte_unit(values) -> tuple[str, int]:
    """``("MiB", 2**20)``, or ``("KiB", 1024)`` when every value is below 1 MiB (quick runs)."""
    values = [v for v in values if v is not None]
    return ("KiB", 2**10) if values and max(values) < 2**20 else ("MiB", 2**20)


def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds, ``-`` for a missing figure."""
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (e.g. bytes per unit); 0 for one point."""
    x = np.asarray(xs, np.float64)
    y = np.asarray(ys, np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return 0.0
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


def plot_lines(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> Path:
    """Writes a line plot (one line per ``{label: (xs, ys)}``) as PNG.

    Uses matplotlib's object API with the Agg canvas, not pyplot: no global backend switch, no
    GUI, and nothing that warns under ``filterwarnings = error``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Distinct markers and dashes: coinciding lines (e.g. two variants with the same memory)
    # stay visible on top of each other.
    markers, dashes = "osD^v<>", ["-", "--", ":", "-."]
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(
            xs,
            ys,
            marker=markers[i % len(markers)],
            linestyle=dashes[i % len(dashes)],
            markerfacecolor="none",
            label=label,
        )
    if logx:
        ax.set_xscale("log", base=2)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report(out_dir: Path, name: str, text: str) -> Path:
    """Prints ``text`` and writes it to ``<out_dir>/<name>.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    print(text, flush=True)
    print(f"wrote {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------
# Train steps
# --------------------------------------------------------------------------------------------


def _config(
    model: str, overrides: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> train.TrainConfig:
    return train.TrainConfig(model=model, model_overrides=dict(overrides), **dict(config or {}))


def abstract_train_step(
    model: str,
    overrides: Mapping[str, Any],
    *,
    batch_size: int,
    image_size: int,
    in_channels: int = 3,
    num_classes: int = 10,
    donate: bool = False,
    config: Mapping[str, Any] | None = None,
):
    """`revjax.train.steps.abstract_train_step` for a preset by name: ``(step, state, batch)``.

    Args:
      model: a preset name of `revjax.models` (``"revnet164"``, ``"resnet_tiny"``, ...).
      overrides: constructor arguments (``units_per_stage``, ``memory_saving``, ``unroll``...).
      batch_size, image_size, in_channels, num_classes: the batch and the model's shapes.
      donate: donate the state as the training loop does (old and new state share buffers).
      config: other `revjax.train.TrainConfig` fields (optimizer, ``layer_decay``, ``freeze``...:
        a fine-tuning recipe); the defaults otherwise.
    """
    return abstract_train_step_of(
        _config(model, overrides, config), num_classes, in_channels,
        (image_size, image_size, in_channels), batch_size, donate=donate,
    )


def concrete_train_step(
    model: str,
    overrides: Mapping[str, Any],
    *,
    batch_size: int,
    image_size: int,
    in_channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
    donate: bool = False,
):
    """As `abstract_train_step`, with an initialised state and a random batch on the device.

    ``donate=True`` donates the state, as the trainer's loop does, so the old and the new state
    don't coexist (matters for the largest batch that fits); the state passed in is then
    consumed by each call.
    """
    cfg = _config(model, overrides)
    graphdef, state, tx = train.create_train_state(cfg, num_classes, in_channels)
    step = jax.jit(train.make_train_step(graphdef, tx), donate_argnums=0 if donate else ())
    k_img, k_lab = jax.random.split(jax.random.PRNGKey(seed))
    batch = {
        "image": jax.random.normal(
            k_img, (batch_size, image_size, image_size, in_channels), jnp.float32
        ),
        "label": jax.random.randint(k_lab, (batch_size,), 0, num_classes, jnp.int32),
    }
    return step, state, batch


def num_params(state: Any) -> int:
    """Trainable parameters of a (concrete or abstract) train state."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params))


def compiled_step_memory(step, state, batch) -> CompiledMemory:
    """Compiled memory of ``step(state, batch)``; on CPU compiled with
    `CPU_MEMORY_COMPILER_OPTIONS` (same bytes, faster), since this code is never run."""
    lowered = step.lower(state, batch)
    options = CPU_MEMORY_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return compiled_memory(lowered.compile(compiler_options=options))


# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------


def require_accelerator(what: str, *, allow_cpu: bool = False) -> str:
    """Returns the backend name; exits with a clear message when it is the CPU.

    Args:
      what: the program, for the message.
      allow_cpu: let CPU through (tests).

    Raises:
      SystemExit: no GPU/TPU is visible and ``allow_cpu`` is False (exit status 1, with the
        message on stderr); never silently measures the CPU instead.
    """
    backend = jax.default_backend()
    if backend == "cpu" and not allow_cpu:
        raise SystemExit(
            f"{what}: no GPU/TPU visible: jax.default_backend() is 'cpu' (devices: "
            f"{jax.devices()}, JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '<unset>')!r}). "
            "This measurement is only meaningful on an accelerator, so it refuses to fall back "
            "to the CPU. Check that a CUDA jaxlib is installed (`pip show jax-cuda12-plugin`), "
            "that `nvidia-smi` sees the GPU, and that JAX_PLATFORMS / CUDA_VISIBLE_DEVICES do "
            "not hide it."
        )
    return backend


def run_json_worker(module: str, args: Sequence[str], *, timeout: float) -> list[dict]:
    """Runs ``python -m <module> <args>`` in a fresh process; returns its JSON output lines.

    A fresh process starts with an empty device allocator, so its peak memory and its
    out-of-memory behaviour belong to one configuration only. The worker prints one JSON object
    per line (other lines are ignored); a crash or a timeout raises with its output.
    """
    env = dict(os.environ)
    # Each worker owns the device for its run; don't let it grab 75% of it up front.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if proc.returncode != 0 and not records:
        raise RuntimeError(
            f"worker `{shlex.join([module, *args])}` failed with exit status {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return records
