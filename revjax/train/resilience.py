"""What keeps a long training run alive: clean stops on SIGTERM / SIGINT, damaged checkpoints.

- `StopSignals` turns SIGTERM (cluster / cloud preemption, `kill`) and SIGINT (Ctrl-C, a
  notebook's interrupt) into a flag the training loop reads after each step; the loop then saves
  a checkpoint and raises `Preempted`. With several processes the flag is agreed on with a tiny
  all-gather every `sync_every` steps, so every process stops at the same step and they write
  one coordinated checkpoint. A second signal while the first is being handled gives up on the
  clean stop (the signal's default action: Ctrl-C twice raises `KeyboardInterrupt`).
- `restore_latest` resumes from the newest *readable* checkpoint: a damaged newer one (a
  truncated or missing file) is moved aside with a `DamagedCheckpointWarning` naming it; none
  readable raises `NoReadableCheckpointError` naming the directory; a checkpoint whose arrays do
  not match the model being trained raises `CheckpointMismatchError` before Orbax is asked to
  read anything.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

DAMAGED_DIR = "damaged_checkpoints"


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------


class Preempted(Exception):
    """Training stopped on a signal: after saving a checkpoint at ``step``, or before the first
    step (``started`` False: nothing was trained and no checkpoint was written; ``step`` is
    the step of the checkpoint the run would have resumed from, untouched, or 0).

    ``exit_code`` is the status a command-line program should exit with: 128 + the signal
    number (143 for SIGTERM, 130 for SIGINT), the shell's convention for "ended by a signal".
    Calling `revjax.train.train_and_evaluate` again with the same config and workdir resumes.
    ``checkpoint`` is the checkpoint to resume from (``None``: there is none).
    """

    def __init__(self, step: int, signum: int, workdir: str | os.PathLike, started: bool = True):
        self.step = int(step)
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        self.workdir = Path(workdir)
        self.started = bool(started)
        has_checkpoint = started or self.step > 0
        self.checkpoint = self.workdir / "checkpoints" / str(self.step) if has_checkpoint else None
        self.exit_code = 128 + self.signum
        super().__init__(f"Stopped by {self.signal_name} {self.outcome()}")

    def outcome(self) -> str:
        """What the stop left behind, in words (the end of the message)."""
        resume = "Run again with the same config and workdir to resume."
        if self.started:
            return f"at step {self.step}; checkpoint saved in {self.checkpoint}. {resume}"
        if self.checkpoint is None:
            return "before the first step: nothing was trained and no checkpoint was written."
        return (f"before the first step: the checkpoint at step {self.step} ({self.checkpoint}) "
                f"is untouched. {resume}")


class StopSignals:
    """Records SIGTERM / SIGINT instead of dying; `agreed(step)` says when to stop.

    Handlers are installed by `install()` only in the main thread (Python delivers signals
    there; elsewhere this is a no-op and the signals keep their previous behaviour) and
    put back by `restore()`. The first signal puts the previous handlers back at once, so a
    second one acts as it would without this class even while a long native call (an XLA
    compile) keeps Python from running any handler: the default SIGTERM action ends the
    process, a notebook's interrupt raises `KeyboardInterrupt`.

    ``announce`` (settable): print a line on the first signal (on during training, where the
    step in flight and the checkpoint take a while; off during start-up, where the stop
    follows at the end of the current phase and its own line says what happened).
    """

    def __init__(self, sync_every: int = 1, signals=(signal.SIGTERM, signal.SIGINT)):
        self.sync_every = max(int(sync_every), 1)
        self.signals = tuple(signals)
        self.received: int | None = None
        self.announce = True
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler not installed from Python (e.g. by a C++ runtime); the default
            # action is the safe choice (a process that ignores SIGTERM cannot be stopped).
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal raced the restore below
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        self.restore()  # a second signal: stop now, the previous way
        if self.announce and jax.process_index() == 0:
            print(
                f"Received {signal.Signals(signum).name}: finishing the current step, then "
                "saving a checkpoint (send it again to stop at once).",
                file=sys.stderr, flush=True,
            )

    def agreed(self, step: int) -> int | None:
        """The signal every process stops on after ``step``, or None to go on.

        Call it on every process after every step: with several processes it is a collective
        (an all-gather of one int) every `sync_every` steps.
        """
        if jax.process_count() > 1 and step % self.sync_every:
            return None
        return self.agreed_now()

    def agreed_now(self) -> int | None:
        """The signal every process stops on now, or None; a collective with several
        processes (call it at the same point on every process)."""
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.int32(self.received or 0)))
        flags = flags[flags > 0]
        return int(flags.min()) if flags.size else None


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint could not be read and was skipped (moved aside)."""


class NoReadableCheckpointError(RuntimeError):
    """Every checkpoint in the directory is damaged."""


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model or config (array shapes differ)."""


def checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        workdir / "checkpoints",
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def save(manager, step: int, state: Any, data_state: Mapping[str, Any],
         record: Mapping[str, Any] | None = None) -> None:
    """Writes ``state``, the data iterator's position and the config ``record`` as one step."""
    import orbax.checkpoint as ocp

    # Orbax writes to a temporary directory and renames it when complete: atomic. The data
    # iterator's position and the config record go into the same step, so they cannot
    # disagree with the arrays.
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(dict(data_state))}
    if record is not None:
        items["config"] = ocp.args.JsonSave(dict(record))
    manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()


def read_record(manager, step: int) -> dict | None:
    """The config record saved with checkpoint ``step``; None for a checkpoint without one
    (written before checkpoints carried it) or an unreadable record."""
    import orbax.checkpoint as ocp

    try:
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception:  # no "config" item (KeyError), or a damaged one: resume without it
        return None
    record = restored["config"]
    return dict(record) if isinstance(record, Mapping) else None


def _restore(manager, step: int, target: Any) -> tuple[Any, dict]:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
        ),
    )
    if not isinstance(restored["data"], Mapping):
        raise ValueError(f"the data position is {restored['data']!r}, not a dict")
    return restored["state"], dict(restored["data"])


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(p for p in parts if p != "value")


def _arrays(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        _path_name(p): (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _differences(on_disk: dict, wanted: dict, limit: int = 3) -> list[str]:
    out = []
    for name in sorted(set(on_disk) | set(wanted)):
        if name not in on_disk:
            out.append(f"{name} is missing from the checkpoint")
        elif name not in wanted:
            out.append(f"{name} is in the checkpoint but not in this model")
        elif on_disk[name] != wanted[name]:
            (s1, d1), (s2, d2) = on_disk[name], wanted[name]
            out.append(f"{name} is {d1}{list(s1)} there but {d2}{list(s2)} here")
    if len(out) > limit:
        out = out[:limit - 1] + [f"{out[limit - 1]} (and {len(out) - limit} more)"]
    return out


def restore_latest(manager, target: Any, workdir: Path) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint into the structure of ``target``.

    Returns ``(step, state, data_state)``, or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint holds different arrays.
      NoReadableCheckpointError: checkpoints exist but none can be read.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    directory = Path(manager.directory)
    wanted = _arrays(target)
    damaged: list[tuple[int, str]] = []
    for step in steps:
        try:
            on_disk = _arrays(manager.item_metadata(step)["state"])
            if not on_disk:
                raise FileNotFoundError("no array metadata (state/_METADATA missing)")
        except Exception as err:  # unreadable metadata: a damaged checkpoint
            damaged.append((step, _short(err)))
            continue
        diffs = _differences(on_disk, wanted)
        if diffs:
            record = read_record(manager, step) or {}
            named = f" ({record['name']})" if record.get("name") else ""
            raise CheckpointMismatchError(
                f"The checkpoint {directory / str(step)} was written by a different model or "
                f"config{named}: {'; '.join(diffs)}. Train this config in a new workdir, or "
                "resume with the model settings that wrote it."
            )
        try:
            state, data_state = _restore(manager, step, target)
        except Exception as err:  # a truncated or missing array file
            damaged.append((step, _short(err)))
            continue
        if damaged:
            _set_aside(manager, [s for s, _ in damaged], workdir, directory, step, damaged)
        return step, state, data_state
    if damaged:
        listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
        raise NoReadableCheckpointError(
            f"No readable checkpoint in {directory} ({listed}). Restore the checkpoints from a "
            "copy, or move the directory away to train from scratch."
        )
    return None


def _short(err: BaseException) -> str:
    text = str(err).strip().split(". See full")[0].splitlines()  # TensorStore's spec dump
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def _set_aside(manager, steps, workdir: Path, directory: Path, resumed: int, damaged) -> None:
    """Moves damaged step directories out of Orbax's sight (a later save of the same step
    would otherwise collide with them); process 0 moves, everyone waits for it."""
    aside = workdir / DAMAGED_DIR
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            os.replace(directory / str(step), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("revjax_damaged_checkpoints_moved")
    manager.reload()
    for step, why in damaged:
        message = (
            f"Skipped damaged checkpoint {directory / str(step)} ({why}); moved it to "
            f"{aside / str(step)} and resumed from step {resumed}."
        )
        warnings.warn(message, DamagedCheckpointWarning, stacklevel=3)
