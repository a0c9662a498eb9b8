"""The config record each checkpoint carries: which config wrote it, every field, and when.

On resume the trainer prints one line naming the checkpoint's step, time and config, and warns
once (`ConfigChangedWarning`) when the config being trained differs from the recorded one,
listing each changed field as ``old -> new``. A changed array shape is not a warning: it stops
the restore with `revjax.train.CheckpointMismatchError`.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from revjax.train.config import TrainConfig

__all__ = [
    "ConfigChangedWarning",
    "changed_fields",
    "changed_message",
    "config_label",
    "config_record",
    "field_text",
    "resume_line",
]


class ConfigChangedWarning(UserWarning):
    """A run resumed a checkpoint written by a config with different field values."""


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def field_text(value: Any) -> str:
    """A field's value as Python source (what ``--set key=...`` takes); mappings with sorted
    keys, so equal configs give equal text."""
    return repr(_canonical(value))


def config_record(config: TrainConfig, name: str | None = None) -> dict[str, Any]:
    """The JSON record of ``config`` saved beside a checkpoint: ``name`` (the config's name,
    e.g. ``"digits --quick"``; None for a config made in Python), ``written`` (UTC, ISO 8601)
    and ``fields`` (every field as `field_text`)."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fields = {f.name: field_text(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {"name": name, "written": now, "fields": fields}


def changed_fields(record: Mapping[str, Any], config: TrainConfig) -> list[tuple[str, str, str]]:
    """``(field, recorded, now)`` for each field whose value differs from the record; fields
    only one side knows (written by another version of revjax) are left out."""
    recorded = record.get("fields") or {}
    out = []
    for f in dataclasses.fields(config):
        if f.name in recorded:
            now = field_text(getattr(config, f.name))
            if recorded[f.name] != now:
                out.append((f.name, recorded[f.name], now))
    return out


def _when(record: Mapping[str, Any] | None, step_dir: Path) -> str:
    stamp = record.get("written") if record else None
    try:
        when = datetime.datetime.fromisoformat(stamp) if stamp else None
    except (TypeError, ValueError):
        when = None
    if when is None:
        try:
            when = datetime.datetime.fromtimestamp(step_dir.stat().st_mtime, datetime.timezone.utc)
        except OSError:
            return "at an unknown time"
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def config_label(name: str | None) -> str:
    """How a config is named in messages."""
    return f"config {name}" if name else "a config made in Python"


def resume_line(step: int, workdir: Path, record: Mapping[str, Any] | None) -> str:
    """``Resuming from step N of <workdir> (checkpoint written <when> by config <name>)``;
    for a checkpoint without a record, says so."""
    when = _when(record, workdir / "checkpoints" / str(step))
    who = "; no config record" if record is None else f" by {config_label(record.get('name'))}"
    return f"Resuming from step {step} of {workdir} (checkpoint written {when}{who})"


def changed_message(record: Mapping[str, Any], config: TrainConfig, name: str | None) -> str | None:
    """The `ConfigChangedWarning` text for resuming ``record`` with ``config``, or None when
    every recorded field is unchanged."""
    changes = changed_fields(record, config)
    if not changes:
        return None
    listed = ", ".join(f"{k} {old} -> {new}" for k, old, new in changes)
    return (
        f"The checkpoint was written by {config_label(record.get('name'))}; this run "
        f"({config_label(name)}) changes {len(changes)} field{'s' if len(changes) > 1 else ''}: "
        f"{listed}. Training continues with the new values; use a new workdir to train this "
        "config from scratch."
    )
