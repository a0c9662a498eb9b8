"""The training loop: `train_and_evaluate` and its periodic actions (log, drift check,
evaluation, checkpoint, preemption), each a small function below."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from revjax._resilience import (
    Preempted,
    StopSignals,
    checkpoint_manager,
    restore_latest,
    save,
)
from revjax.measure import device_peak_bytes
from revjax.train.config import TrainConfig
from revjax.train.inputs import (
    DATA_AXIS,
    check_batch_size,
    make_eval_input,
    make_mesh,
    make_train_input,
    maybe_initialize_distributed,
)
from revjax.train.optim import learning_rate_schedule
from revjax.train.report import (
    MetricWriter,
    format_memory_report,
    host_rss_bytes,
    progress_bar,
    train_step_memory,
)
from revjax.train.steps import (
    create_train_state,
    evaluate,
    make_eval_step,
    make_train_step,
    step_options,
)

__all__ = ["NonFiniteLossError", "train_and_evaluate"]

_log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; ``step`` names the first such step."""

    def __init__(self, step: int, workdir: str | os.PathLike | None = None):
        self.step = step
        where = f" The last good checkpoint is kept in {workdir}." if workdir else ""
        super().__init__(
            f"Training loss is NaN/Inf at step {step}; stopping.{where} Lower the learning rate, "
            "check the input data, or resume from the checkpoint."
        )


class _LossWatch:
    """Losses of the steps since the last check. Checked only before a log record or a
    checkpoint, so the loop never waits for the device after each step."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, loss: jax.Array) -> None:
        self.pending.append((step, loss))

    def check(self) -> None:
        """Raises `NonFiniteLossError` naming the first step whose loss is NaN/Inf."""
        pending, self.pending = self.pending, []
        for step, loss in pending:
            if not np.isfinite(float(loss)):
                raise NonFiniteLossError(step, self.workdir)


class _MetricWindow:
    """The train metrics since the last log record, and when that record was made."""

    def __init__(self):
        self.metrics: list[dict[str, jax.Array]] = []
        self.start = time.perf_counter()

    def record(self, batch_size: int, learning_rate: float) -> dict[str, float]:
        """Mean loss and accuracy, throughput and memory of the window; starts the next one."""
        elapsed = time.perf_counter() - self.start
        record = {
            "train_loss": float(np.mean([float(m["loss"]) for m in self.metrics])),
            "train_accuracy": float(np.mean([float(m["accuracy"]) for m in self.metrics])),
            "learning_rate": learning_rate,
            "images_per_second": len(self.metrics) * batch_size / max(elapsed, 1e-9),
        }
        rss = host_rss_bytes()
        if rss is not None:
            record["host_rss_bytes"] = rss
        peak = device_peak_bytes()
        if peak is not None:
            record["peak_device_bytes"] = peak
        self.metrics.clear()
        self.start = time.perf_counter()
        return record


def _restore(manager, state, workdir: Path, train_input, sharding) -> tuple[int | None, Any]:
    """``(step, state)`` of the latest readable checkpoint (the input position restored into
    ``train_input``), or ``(None, state)`` for a fresh run; closes ``manager`` on failure."""
    try:
        restored = restore_latest(manager, state, workdir)  # skips damaged, names mismatched
    except BaseException:
        manager.close()
        raise
    if restored is None:
        return None, state
    latest, state, data_state = restored
    train_input.set_state(data_state)
    _log.info("Resumed from step %d in %s", int(latest), workdir)
    return int(latest), jax.device_put(state, sharding)


def _report_memory(config: TrainConfig, info, writer: MetricWriter) -> dict[str, int]:
    """Compiles the train step of the model, its plain variant and its twin; prints and
    records their temporary memory."""
    mem = train_step_memory(config, info.num_classes, info.image_shape[2], info.image_shape)
    if jax.process_index() == 0:
        print(format_memory_report(mem, config), flush=True)
    writer.write(0, {f"compiled_temp_bytes/{k}": v for k, v in mem.items()})
    return mem


def _drift_monitor(config: TrainConfig, graphdef):
    if not config.drift_every:
        return None
    from revjax.drift import DriftMonitor

    return DriftMonitor(graphdef, threshold=config.drift_threshold)


def _check_drift(monitor, state, train_input, step: int, writer: MetricWriter) -> None:
    """Reconstruction error of the reversible stages on the batch of the last step."""
    image = train_input.batch_at(step - 1)["image"]
    drift = monitor.check(state.params, state.batch_stats, image)
    writer.write(step, {f"drift/{k}": v for k, v in drift.items()})


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Args:
      config: the run.
      workdir: checkpoints (``checkpoints/``), ``metrics.jsonl`` and TensorBoard summaries
        (``tensorboard/``) go here. A second call with the same workdir resumes, including the
        position of the data iterator, so an interrupted run ends with the same weights as an
        uninterrupted one.

    Returns:
      The final metrics: ``eval_accuracy``, ``eval_loss``, ``train_loss``, ``step``,
      ``images_per_second``, and the memory report where computed.

    On SIGTERM or SIGINT the step in flight finishes, a checkpoint is written and `Preempted`
    is raised (every process stops at the same step); calling again resumes. A damaged newest
    checkpoint is skipped with a `DamagedCheckpointWarning` (moved to ``damaged_checkpoints/``).

    Raises:
      Preempted: stopped by a signal after saving a checkpoint (``exit_code``: 128 + signal).
      CheckpointMismatchError: the workdir's checkpoint holds a different model's arrays.
      NoReadableCheckpointError: the workdir has checkpoints but none can be read.
      NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
      revjax.data.DatasetNotPreparedError: the dataset is not prepared in ``data_dir``.
      ValueError: a batch size the devices cannot split evenly, unknown names.
    """
    from revjax import data  # the input pipeline needs the experiments extra

    maybe_initialize_distributed()
    workdir = Path(workdir).expanduser().absolute()  # Orbax requires absolute paths
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.num_devices)
    eval_batch_size = config.eval_batch_size or config.batch_size
    check_batch_size(config.batch_size, mesh)
    check_batch_size(eval_batch_size, mesh, "eval_batch_size")
    info = data.get_dataset_info(config.dataset, config.image_size)
    image_size = info.image_shape[0]

    # Fails early, with the prepare command, if data are missing.
    train_input = make_train_input(config, mesh, image_size)
    eval_iter = make_eval_input(config, mesh, image_size, train_input.kind, eval_batch_size)

    graphdef, state, tx = create_train_state(config, info.num_classes, info.image_shape[2])
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    state = jax.device_put(state, replicated)
    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    last_saved, state = _restore(manager, state, workdir, train_input, replicated)
    step = last_saved or 0

    train_step = jax.jit(
        train_input.wrap_step(make_train_step(graphdef, tx, **step_options(config))),
        in_shardings=(replicated, *train_input.arg_shardings()),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(graphdef), in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )

    def run_eval(state) -> dict:
        return evaluate(eval_step, state, eval_iter(), batch_sharding)

    writer = MetricWriter(workdir)
    result: dict[str, Any] = {}
    if config.memory_report and step == 0:
        result["memory"] = _report_memory(config, info, writer)
    drift_monitor = _drift_monitor(config, graphdef)
    schedule = learning_rate_schedule(config)
    losses, window = _LossWatch(workdir), _MetricWindow()
    bar = progress_bar(config.num_steps, step)

    def checkpoint():
        losses.check()
        save(manager, step, state, train_input.get_state())

    stop = StopSignals(config.preemption_sync_every)  # SIGTERM/SIGINT: save, then stop
    stop.install()
    try:
        while step < config.num_steps:
            state, metrics = train_step(state, *train_input.step_args(step))
            step += 1
            losses.add(step, metrics["loss"])
            window.metrics.append(metrics)
            if bar is not None:
                bar.update(1)
            if _due(step, config.log_every) or step == config.num_steps:
                losses.check()
                record = window.record(config.batch_size, float(schedule(step - 1)))
                writer.write(step, record)
                result.update(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                    acc=f"{record['train_accuracy']:.3f}")
            if drift_monitor is not None and _due(step, config.drift_every):
                _check_drift(drift_monitor, state, train_input, step, writer)
            if _due(step, config.eval_every) and step != config.num_steps:
                writer.write(step, run_eval(state))
            if _due(step, config.checkpoint_every):
                checkpoint()
                last_saved = step
            signum = stop.agreed(step)  # the same decision on every process
            if signum is not None:
                if last_saved != step:
                    checkpoint()
                losses.check()
                raise Preempted(step, signum, workdir)
        if last_saved != step:
            checkpoint()
        losses.check()
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        manager.close()
        train_input.close()

    record = run_eval(state)
    writer.write(step, record)
    writer.close()
    result.update(record)
    result["step"] = step
    result["state"] = state
    return result
