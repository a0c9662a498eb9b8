"""The training loop: `train_and_evaluate` and its periodic actions (log, drift check,
evaluation, checkpoint, preemption), each a small function below."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from revjax.layers import check_carry_range, check_rebuild
from revjax.measure import device_peak_bytes
from revjax.train.config import TrainConfig, check_init_from
from revjax.train.inputs import (
    check_batch_size,
    dataset_info,
    is_text,
    make_eval_input,
    make_mesh,
    make_train_input,
    maybe_initialize_distributed,
)
from revjax.train.optim import learning_rate_schedule
from revjax.train.record import ConfigChangedWarning, changed_message, config_record, resume_line
from revjax.train.report import (
    MetricWriter,
    format_memory_report,
    host_rss_bytes,
    progress_bar,
    train_step_memory,
)
from revjax.train.resilience import (
    Preempted,
    StopSignals,
    checkpoint_manager,
    read_record,
    restore_latest,
    save,
)
from revjax.train.sharding import batch_sharding, create_sharded_train_state
from revjax.train.steps import (
    TrainState,
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


def _check_health(state, losses: _LossWatch) -> None:
    """Before a log record or a checkpoint: `revjax.CarryRangeError` naming a fixed-point
    sequence whose carries left their range (its NaN outputs can turn back into numbers
    downstream, so the recorded peak is the signal), then `NonFiniteLossError`. A sequence
    whose backward rebuilt some unit differently from its forward gets one
    `revjax.RebuildMismatchWarning` (the first time its running count is non-zero)."""
    check_carry_range(state.batch_stats)
    check_rebuild(state.batch_stats)
    losses.check()


class _MetricWindow:
    """The train metrics since the last log record, and when that record was made."""

    def __init__(self):
        self.metrics: list[dict[str, jax.Array]] = []
        self.start = time.perf_counter()

    def record(self, batch_size: int, learning_rate: float) -> dict[str, float]:
        """Mean loss and accuracy, throughput and memory of the window; starts the next one.
        A model with fixed-point sequences also gets ``rebuild_mismatches``: the unit rebuilds
        that differed from the forward, summed over the window's steps."""
        elapsed = time.perf_counter() - self.start
        record = {
            "train_loss": float(np.mean([float(m["loss"]) for m in self.metrics])),
            "train_accuracy": float(np.mean([float(m["accuracy"]) for m in self.metrics])),
            "learning_rate": learning_rate,
            "images_per_second": len(self.metrics) * batch_size / max(elapsed, 1e-9),
        }
        if self.metrics and "rebuild_mismatches" in self.metrics[0]:
            record["rebuild_mismatches"] = float(
                sum(float(m["rebuild_mismatches"]) for m in self.metrics))
        rss = host_rss_bytes()
        if rss is not None:
            record["host_rss_bytes"] = rss
        peak = device_peak_bytes()
        if peak is not None:
            record["peak_device_bytes"] = peak
        self.metrics.clear()
        self.start = time.perf_counter()
        return record


def _restore(manager, state, workdir: Path, train_input, sharding, config: TrainConfig,
             config_name: str | None) -> tuple[int | None, Any]:
    """``(step, state)`` of the latest readable checkpoint (the input position restored into
    ``train_input``), or ``(None, state)`` for a fresh run. Prints the resume line and warns
    once (`ConfigChangedWarning`) when the checkpoint's config record differs from ``config``."""
    restored = restore_latest(manager, state, workdir)  # skips damaged, names mismatched
    if restored is None:
        return None, state
    latest, state, data_state = restored
    train_input.set_state(data_state)
    record = read_record(manager, latest)
    if jax.process_index() == 0:
        print(resume_line(int(latest), workdir, record), flush=True)
    changed = changed_message(record, config, config_name) if record else None
    if changed:
        warnings.warn(changed, ConfigChangedWarning, stacklevel=3)
    return int(latest), jax.device_put(state, sharding)


def _say(text: str) -> None:
    """A status line on process 0 (what the trainer is doing before step 1)."""
    if jax.process_index() == 0:
        print(text, flush=True)


def _while_handling_signals(fn):
    """``fn()`` in a helper thread while the main thread waits in short joins, so Python's
    signal handlers run during a long native call (an XLA compile), where the main thread
    would otherwise not run them until the call returns: the first signal is recorded at
    once and a second one acts at once. Outside the main thread: ``fn()`` directly."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    out: dict[str, Any] = {}
    # JAX's configuration contexts are thread-local: the helper thread traces under the
    # caller's (e.g. a `jax.numpy_dtype_promotion` or `jax.enable_x64` block around the call).
    promotion, x64 = jax.config.jax_numpy_dtype_promotion, jax.config.jax_enable_x64

    def run():
        try:
            with jax.numpy_dtype_promotion(promotion), jax.enable_x64(x64):
                out["value"] = fn()
        except BaseException as err:  # re-raised in the calling thread
            out["error"] = err

    worker = threading.Thread(target=run, name="revjax-compile", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    if "error" in out:
        raise out["error"]
    return out["value"]


class _StartUp:
    """Stops the start-up cleanly on a SIGTERM / SIGINT received so far: `check()` between
    phases (never inside a compile) raises `Preempted` with ``started`` False, naming the
    checkpoint a resume would use (``resumed``), untouched."""

    def __init__(self, stop: StopSignals, workdir: Path):
        self.stop, self.workdir, self.resumed = stop, workdir, 0

    def check(self) -> None:
        signum = self.stop.agreed_now()  # the same decision on every process
        if signum is not None:
            raise Preempted(self.resumed, signum, self.workdir, started=False)


def _report_memory(config: TrainConfig, info, writer: MetricWriter, check) -> dict[str, int]:
    """Compiles the train step of the model, its plain variant and its twin; prints and
    records their temporary memory."""
    twin = f" and its twin {config.twin_model}" if config.twin_model else ""
    _say(f"Compiling {config.model}'s train step with memory saving on and off{twin} for the "
         "memory report...")
    mem = _while_handling_signals(lambda: train_step_memory(
        config, info.num_classes, info.image_shape[2], info.image_shape, before_compile=check))
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


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike, *,
                       config_name: str | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Args:
      config: the run.
      workdir: checkpoints (``checkpoints/``), ``metrics.jsonl`` and TensorBoard summaries
        (``tensorboard/``) go here. A second call with the same workdir resumes, including the
        position of the data iterator, so an interrupted run ends with the same weights as an
        uninterrupted one.
      config_name: the config's name, recorded in each checkpoint with every field of
        ``config`` (the command line passes e.g. ``"digits --quick"``).

    Returns:
      ``(state, metrics)``: the final `TrainState` and the final metrics (``eval_accuracy``,
      ``eval_loss``, ``train_loss``, ``step``, ``images_per_second``, and the memory report
      where computed).

    Resuming prints one line naming the checkpoint's step, time and config, and a changed
    field value gives one `ConfigChangedWarning` listing every change (``old -> new``).

    SIGTERM and SIGINT are caught from the start. Before the first step (loading data,
    compiling) the run stops at the end of the current phase and raises `Preempted` with
    ``started`` False: nothing trained, no checkpoint written or changed. During training the
    step in flight finishes, a checkpoint is written and `Preempted` is raised (every process
    stops at the same step); calling again resumes. A second signal acts at once, as it would
    without the trainer. A damaged newest checkpoint is skipped with a
    `DamagedCheckpointWarning` (moved to ``damaged_checkpoints/``).

    The loop is below, in this function; `_set_up` builds what it needs (`_Setup`). Every
    resource (signal handlers, the metric writer, the checkpoint manager, the input pipeline,
    the progress bar) is closed on the way out, whatever ends the run.

    Raises:
      Preempted: stopped by a signal (``exit_code``: 128 + signal).
      CheckpointMismatchError: the workdir's checkpoint holds a different model's arrays.
      NoReadableCheckpointError: the workdir has checkpoints but none can be read.
      NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
      revjax.data.DatasetNotPreparedError: the dataset is not prepared in ``data_dir``.
      ConfigError: a batch size the devices cannot split evenly, too many devices.
      ValueError: unknown names.
    """
    stop = StopSignals(config.preemption_sync_every)
    stop.announce = False  # before step 1 the stop's own line says what happened
    with contextlib.ExitStack() as cleanup:
        stop.install()  # before anything slow: the first compile takes a while
        cleanup.callback(stop.restore)
        setup = _set_up(config, Path(workdir), config_name, stop, cleanup)
        state, step, last_saved = setup.state, setup.step, setup.step or None
        metrics: dict[str, Any] = {} if setup.memory is None else {"memory": setup.memory}
        schedule = learning_rate_schedule(config)
        losses, window = _LossWatch(setup.workdir), _MetricWindow()
        bar = progress_bar(config.num_steps, step)
        if bar is not None:
            cleanup.callback(bar.close)
        record = config_record(config, config_name)

        def checkpoint():
            _check_health(state, losses)
            save(setup.manager, step, state, setup.train_input.get_state(), record)

        stop.announce = True  # from here: finish the step in flight, save, then stop
        while step < config.num_steps:
            args = setup.first_args if step == setup.step else setup.train_input.step_args(step)
            state, step_metrics = setup.train_step(state, *args)
            step += 1
            losses.add(step, step_metrics["loss"])
            window.metrics.append(step_metrics)
            if bar is not None:
                bar.update(1)
            if _due(step, config.log_every) or step == config.num_steps:
                _check_health(state, losses)
                logged = window.record(config.batch_size, float(schedule(step - 1)))
                setup.writer.write(step, logged)
                metrics.update(logged)
                if bar is not None:
                    bar.set_postfix(loss=f"{logged['train_loss']:.3f}",
                                    acc=f"{logged['train_accuracy']:.3f}")
            if setup.drift_monitor is not None and _due(step, config.drift_every):
                _check_drift(setup.drift_monitor, state, setup.train_input, step, setup.writer)
            if _due(step, config.eval_every) and step != config.num_steps:
                setup.writer.write(step, setup.run_eval(state))
            if _due(step, config.checkpoint_every):
                checkpoint()
                last_saved = step
            signum = stop.agreed(step)  # the same decision on every process
            if signum is not None:
                if last_saved != step:
                    checkpoint()
                _check_health(state, losses)
                raise Preempted(step, signum, setup.workdir)
        if last_saved != step:
            checkpoint()
        _check_health(state, losses)
        stop.restore()  # the final evaluation runs as any code does: a signal stops it at once
        final = setup.run_eval(state)
        setup.writer.write(step, final)
    return state, {**metrics, **final, "step": step}


@dataclasses.dataclass
class _Setup:
    """What the loop of `train_and_evaluate` needs, built by `_set_up`."""

    workdir: Path  # absolute
    train_input: Any  # `make_train_input`'s: step_args, get_state, batch_at
    state: TrainState  # placed by the sharding rules; restored when resuming
    step: int  # the first step to run: the restored checkpoint's, else 0
    train_step: Callable | None  # compiled for ``first_args``; None when nothing is left
    first_args: tuple | None  # the first step's arguments (compiled with them)
    run_eval: Callable[[TrainState], dict[str, float]]  # one pass over the evaluation split
    manager: Any  # the Orbax checkpoint manager
    writer: MetricWriter
    drift_monitor: Any  # a `revjax.DriftMonitor` or None
    memory: dict[str, int] | None  # the compiled-memory report, where made


def _set_up(config: TrainConfig, workdir: Path, config_name: str | None, stop: StopSignals,
            cleanup: contextlib.ExitStack) -> _Setup:
    """Devices, data, state (restored when resuming), the memory report and the compiled step;
    every resource it opens goes on ``cleanup``. Stops with `Preempted` (``started`` False)
    between phases on a signal received so far."""

    maybe_initialize_distributed()
    workdir = workdir.expanduser().absolute()  # Orbax requires absolute paths
    startup = _StartUp(stop, workdir)
    mesh = make_mesh(config.num_devices, config.mesh)
    eval_batch_size = config.eval_batch_size or config.batch_size
    check_batch_size(config.batch_size, mesh)
    check_batch_size(eval_batch_size, mesh, "eval_batch_size")
    check_init_from(config)
    info = dataset_info(config)  # a text dataset's: the vocabulary and the context
    image_size = info.image_shape[0]

    # Fails early, with the prepare command, if data are missing (before the workdir exists).
    train_input = make_train_input(config, mesh, image_size)
    cleanup.callback(train_input.close)
    eval_iter = make_eval_input(config, mesh, image_size, train_input.kind, eval_batch_size)
    startup.check()

    # Parameters and optimizer state placed by the model family's sharding rules (replicated
    # on a pure data-parallel mesh); a checkpoint restores into these shardings, whatever mesh
    # wrote it.
    graphdef, state, tx, shardings = create_sharded_train_state(
        config, info.num_classes, info.image_shape[2], mesh)
    replicated = NamedSharding(mesh, P())
    batch = batch_sharding(mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    manager = _checkpoint_manager(workdir, config.keep_checkpoints, cleanup)
    last_saved, state = _restore(manager, state, workdir, train_input, shardings, config,
                                 config_name)
    step = startup.resumed = last_saved or 0
    startup.check()

    writer = MetricWriter(workdir)
    cleanup.callback(writer.close)
    memory = None
    # The memory report compiles image models' steps; language models have bench_lm.
    if config.memory_report and step == 0 and not is_text(config):
        memory = _report_memory(config, info, writer, startup.check)
        startup.check()

    # Compiled ahead of step 1 (with its arguments), so a signal during the compile stops
    # before anything is trained.
    train_step, first_args = None, None
    if step < config.num_steps:
        first_args = train_input.step_args(step)
        devices = mesh.devices.size
        _say(f"Compiling the train step ({config.model}, batch {config.batch_size} over "
             f"{devices} device{'s' if devices > 1 else ''})...")
        jitted = jax.jit(
            train_input.wrap_step(make_train_step(graphdef, tx, **step_options(config))),
            in_shardings=(shardings, *train_input.arg_shardings()),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )

        def compile_step():
            with jax.set_mesh(mesh):  # the models' activation constraints see the mesh
                return jitted.lower(state, *first_args).compile()

        train_step = _while_handling_signals(compile_step)
        startup.check()
    eval_step = jax.jit(
        make_eval_step(graphdef), in_shardings=(shardings, batch), out_shardings=replicated,
    )

    def run_eval(state) -> dict:
        with jax.set_mesh(mesh):
            return evaluate(eval_step, state, eval_iter(), batch)

    return _Setup(
        workdir=workdir, train_input=train_input, state=state, step=step, train_step=train_step,
        first_args=first_args, run_eval=run_eval, manager=manager, writer=writer,
        drift_monitor=_drift_monitor(config, graphdef), memory=memory,
    )


def _checkpoint_manager(workdir: Path, keep: int, cleanup: contextlib.ExitStack):
    """The checkpoint manager of ``workdir``, closed by ``cleanup``; a ``checkpoints/`` folder
    it created and nothing was saved into is removed again (a run stopped before its first
    step leaves none behind)."""
    folder = workdir / "checkpoints"
    created = not folder.exists()
    manager = checkpoint_manager(workdir, keep)

    def close():
        manager.close()
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    cleanup.callback(close)
    return manager
