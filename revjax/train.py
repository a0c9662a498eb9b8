"""The training recipe and loop: one trainer for every experiment.

The paper's recipe (the RevNet authors' configs): SGD with momentum 0.9, weight decay added to the
gradient before momentum and applied to conv and dense kernels only, and a piecewise-constant
learning rate (CIFAR: 0.1, x0.1 at 40k and 60k steps, 80k steps at batch 100; ImageNet: 0.1, x0.1
at 160k, 320k and 480k steps, 600k steps at batch 256, weight decay 1e-4).

Data parallelism: a `jax.sharding.Mesh` over every device (all processes), the batch sharded
along its ``"data"`` axis and the parameters replicated. XLA partitions the jitted step, so
BatchNorm statistics are computed over the **global** batch, exactly as on one device. With
several processes, `jax.distributed.initialize()` is called when the usual environment variables
are present and each process reads its own shard of the data.

Typical use::

    from revjax.train import TrainConfig, train_and_evaluate
    train_and_evaluate(TrainConfig(model="revnet38", dataset="digits", num_steps=400), "/tmp/w")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from revjax import models, vit
from revjax._resilience import (
    CheckpointMismatchError,
    DamagedCheckpointWarning,
    NoReadableCheckpointError,
    Preempted,
    StopSignals,
    checkpoint_manager,
    restore_latest,
    save,
)
from revjax.layers import check_carry_range
from revjax.measure import compiled_memory, device_peak_bytes

__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "DamagedCheckpointWarning",
    "NoReadableCheckpointError",
    "NonFiniteLossError",
    "Preempted",
    "TrainConfig",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "warmup_schedule",
    "train_and_evaluate",
    "train_step_memory",
    "weight_decay_mask",
]

_log = logging.getLogger(__name__)

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; experiments/configs/*.py build these.

    Every field is checked (type, range, known names) when the config is made, so a bad value
    raises `ConfigError` naming the field and the fix before anything runs.

    Attributes:
      model: a preset name from `revjax.models` (``"revnet38"``, ``"resnet32"``, ...).
      model_overrides: extra constructor arguments for the preset (widths, memory_saving, ...).
      twin_model: the preset compared against for the memory report (e.g. ResNet-32 for
        RevNet-38); ``None`` skips it.
      twin_overrides: constructor arguments for the twin.
      dataset: a name from `revjax.data.KNOWN_DATASETS`.
      data_dir: TFDS data directory (``None``: TFDS default).
      image_size: image side length (``None``: the dataset's).
      batch_size: global batch size (over all devices and processes).
      eval_batch_size: global evaluation batch size (``None``: ``batch_size``).
      num_steps: optimizer steps.
      learning_rate: initial learning rate.
      lr_boundaries: steps at which the learning rate is multiplied by ``lr_decay``.
      lr_decay: the factor at each boundary.
      momentum: SGD momentum.
      weight_decay: L2 coefficient added to the gradient of conv and dense kernels.
      log_every: steps between train-metric records.
      eval_every: steps between evaluations (0: only at the end).
      checkpoint_every: steps between checkpoints (0: only at the end).
      keep_checkpoints: how many checkpoints to keep.
      seed: seed of initialisation, data order and augmentation.
      num_devices: use the first n local devices (``None``: every device).
      num_workers: Grain worker processes for the input pipeline.
      memory_report: print and record compiled train-step memory vs plain / twin at start.
      drift_every: steps between drift-monitor checks of the reversible stages (0: off).
      drift_threshold: max relative reconstruction error above which the monitor warns.
      input_pipeline: ``"device"``: the training split lives in device memory and each batch is
        shuffled and augmented inside the jitted train step (CIFAR, digits; see
        `revjax.data.device_pipeline`); ``"grain"``: Grain workers on the host and device
        prefetch (every dataset; ImageNet's only option); ``"auto"``: device where the dataset
        supports it and fits, else Grain. The two give different (equally random) orders, so a
        run resumes only with the pipeline it started with.
      prefetch: batches the Grain pipeline copies to the devices ahead of the step.
      preemption_sync_every: with several processes, steps between their agreement on a
        SIGTERM/SIGINT (one all-gather of an int); one process checks after every step for free.

    Transformer options (see "Optimizer options" below; the defaults keep the paper's SGD
    recipe above unchanged):
      optimizer: ``"sgd"`` (the recipe above) or ``"adamw"`` (Adam with decoupled weight decay,
        Loshchilov & Hutter: each step also subtracts ``lr_t * weight_decay * w`` from the
        kernels, outside the adaptive scaling; ``weight_decay`` then means that coefficient).
      adam_b1: AdamW's first-moment decay.
      adam_b2: AdamW's second-moment decay.
      adam_eps: AdamW's epsilon.
      lr_schedule: ``"piecewise"`` (``lr_boundaries`` / ``lr_decay``) or ``"cosine"`` (from
        ``learning_rate`` after the warmup to ``end_learning_rate`` at ``num_steps``).
      warmup_steps: linear warmup from 0 to the schedule over the first steps (0: none).
      end_learning_rate: the cosine schedule's final value.
      label_smoothing: training targets ``(1 - a) * one_hot + a / classes`` (0: plain labels;
        evaluation always reports the plain cross-entropy).
      grad_clip_norm: clip the gradient to this global L2 norm before the optimizer (``None``:
        off).
      compute_dtype: ``"bfloat16"`` (or another float dtype name) for the model's compute
        dtype, with float32 parameters and, in reversible models, float32 streams
        (``carry_dtype``); ``None``: the model's default. ``model_overrides`` take precedence.
      arithmetic: reversible models' carry arithmetic, ``"float"`` or ``"fixed"`` (exact,
        int32 fixed point); ``None``: the model's default. ``model_overrides`` take precedence.
      frac_bits: fraction bits of fixed-point carries; ``None``: the model's default.
    """

    model: str = "revnet38"
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    twin_model: str | None = None
    twin_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    batch_size: int = 100
    eval_batch_size: int | None = None
    num_steps: int = 80_000
    learning_rate: float = 0.1
    lr_boundaries: tuple[int, ...] = (40_000, 60_000)
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    log_every: int = 100
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    seed: int = 0
    num_devices: int | None = None
    num_workers: int = 0
    memory_report: bool = True
    drift_every: int = 0
    drift_threshold: float = 1e-3
    input_pipeline: str = "auto"
    prefetch: int = 2
    preemption_sync_every: int = 1
    # Transformer options (defaults: the SGD recipe above, unchanged).
    optimizer: str = "sgd"
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    lr_schedule: str = "piecewise"
    warmup_steps: int = 0
    end_learning_rate: float = 0.0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    compute_dtype: str | None = None
    arithmetic: str | None = None
    frac_bits: int | None = None

    def __post_init__(self):
        _validate_config(self)


# --------------------------------------------------------------------------------------------
# Config validation: one declarative line per TrainConfig field in _FIELD_CHECKS (a test fails
# when a field has none), checked when the config is made.
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A `TrainConfig` value has the wrong type, range or name; the message says the fix."""


def _model_presets() -> list[str]:
    presets = [n for n in models.__all__ if n[:6] in ("revnet", "resnet")]
    return presets + [n for n in vit.__all__ if n[0].islower()]


def _dataset_names() -> list[str] | None:
    try:
        from revjax.data import KNOWN_DATASETS  # needs the experiments extra (Grain)
    except ImportError:
        return None
    return list(KNOWN_DATASETS)


class _Bad(Exception):
    """Raised by a field check with the expected-value text."""


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _integer(minimum: int, optional: bool = False):
    def check(v):
        if v is None and optional:
            return None
        if not _is_int(v) or v < minimum:
            none = " or None" if optional else ""
            raise _Bad(f"an integer >= {minimum}{none}")
        return int(v)

    return check


def _number(minimum: float, maximum: float = math.inf, open_min: bool = False,
            open_max: bool = False):
    def check(v):
        ok = (_is_int(v) or isinstance(v, float | np.floating)) and not isinstance(v, bool)
        if ok:
            v = float(v)
            ok = math.isfinite(v) and (v > minimum if open_min else v >= minimum)
            ok = ok and (v < maximum if open_max else v <= maximum)
        if not ok:
            lo = f"{'>' if open_min else '>='} {minimum:g}"
            hi = "" if maximum == math.inf else f" and {'<' if open_max else '<='} {maximum:g}"
            raise _Bad(f"a finite number {lo}{hi}")
        return v

    return check


def _optional(check):
    def optional(v):
        if v is None:
            return None
        try:
            return check(v)
        except _Bad as bad:
            raise _Bad(f"{bad} or None") from None

    return optional


def _float_dtype_name(v):
    try:
        ok = isinstance(v, str) and jnp.issubdtype(jnp.dtype(v), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise _Bad("a float dtype name such as 'bfloat16'")
    return v


def _boolean(v):
    if not isinstance(v, bool | np.bool_):
        raise _Bad("True or False")
    return bool(v)


def _path(v):
    if v is None:
        return None
    if not isinstance(v, str | os.PathLike):
        raise _Bad("a directory path (text) or None")
    return os.fspath(v)


def _mapping(v):
    if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
        raise _Bad("a dict of constructor arguments with text keys, e.g. {'widths': (16, 16, 32)}")
    return v


def _steps(v):
    if isinstance(v, str) or not isinstance(v, tuple | list) or not all(
        _is_int(b) and b >= 0 for b in v
    ):
        raise _Bad("a tuple of step numbers >= 0, e.g. (40000, 60000), or () for none")
    return tuple(int(b) for b in v)


def _name(known: Callable[[], list[str] | None], what: str, optional: bool = False):
    def check(v):
        if v is None and optional:
            return None
        names = known()
        if not isinstance(v, str) or (names is not None and v not in names):
            import difflib

            close = difflib.get_close_matches(str(v), names or [], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            none = " or None" if optional else ""
            listed = f": {', '.join(names)}" if names else " (text)"
            raise _Bad(f"a known {what}{none}{hint}{listed}")
        return v

    return check


_FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "model": _name(_model_presets, "model preset"),
    "model_overrides": _mapping,
    "twin_model": _name(_model_presets, "model preset", optional=True),
    "twin_overrides": _mapping,
    "dataset": _name(_dataset_names, "dataset"),
    "data_dir": _path,
    "image_size": _integer(1, optional=True),
    "batch_size": _integer(1),
    "eval_batch_size": _integer(1, optional=True),
    "num_steps": _integer(1),
    "learning_rate": _number(0.0, open_min=True),
    "lr_boundaries": _steps,
    "lr_decay": _number(0.0, open_min=True),
    "momentum": _number(0.0, 1.0, open_max=True),
    "weight_decay": _number(0.0),
    "log_every": _integer(1),
    "eval_every": _integer(0),
    "checkpoint_every": _integer(0),
    "keep_checkpoints": _integer(1),
    "seed": _integer(0),
    "num_devices": _integer(1, optional=True),
    "num_workers": _integer(0),
    "memory_report": _boolean,
    "drift_every": _integer(0),
    "drift_threshold": _number(0.0, open_min=True),
    "input_pipeline": _name(lambda: ["auto", "device", "grain"], "input pipeline"),
    "prefetch": _integer(0),
    "preemption_sync_every": _integer(1),
    "optimizer": _name(lambda: list(OPTIMIZERS), "optimizer"),
    "adam_b1": _number(0.0, 1.0, open_max=True),
    "adam_b2": _number(0.0, 1.0, open_max=True),
    "adam_eps": _number(0.0, open_min=True),
    "lr_schedule": _name(lambda: list(LR_SCHEDULES), "learning-rate schedule"),
    "warmup_steps": _integer(0),
    "end_learning_rate": _number(0.0),
    "label_smoothing": _number(0.0, 1.0, open_max=True),
    "grad_clip_norm": _optional(_number(0.0, open_min=True)),
    "compute_dtype": _optional(_float_dtype_name),
    "arithmetic": _name(lambda: ["float", "fixed"], "carry arithmetic", optional=True),
    "frac_bits": _integer(0, optional=True),
}


def _validate_config(config: TrainConfig) -> None:
    """Checks (and normalises: numpy scalars to Python, lists to tuples) every field."""
    problems = []
    for field in dataclasses.fields(config):
        check = _FIELD_CHECKS.get(field.name)
        if check is None:  # tests/test_reliability.py fails on a field without a check
            continue
        value = getattr(config, field.name)
        try:
            normalised = check(value)
        except _Bad as bad:
            has_default = field.default is not dataclasses.MISSING
            default = f" (default: {field.name}={field.default!r})" if has_default else ""
            problems.append(f"{field.name}={value!r} is invalid: expected {bad}{default}")
            continue
        if normalised is not value:
            object.__setattr__(config, field.name, normalised)
    if problems:
        raise ConfigError("; ".join(problems) + ".")


@struct.dataclass
class TrainState:
    """Pure pytree of everything a step changes."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; ``step`` names the first such step."""

    def __init__(self, step: int, workdir: str | os.PathLike | None = None):
        self.step = step
        where = f" The last good checkpoint is kept in {workdir}." if workdir else ""
        super().__init__(
            f"Training loss is NaN/Inf at step {step}; stopping.{where} Lower the learning rate, "
            "check the input data, or resume from the checkpoint."
        )


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def weight_decay_mask(params: Any) -> Any:
    """True for conv and dense kernels (leaves named ``kernel``), False for everything else
    (BatchNorm scale and bias, dense bias)."""

    def is_kernel(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n != "value"]
        return bool(names) and names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Piecewise-constant: ``learning_rate * lr_decay**k`` from the k-th boundary on.

    Written out rather than `optax.piecewise_constant_schedule`, which mixes float and int
    dtypes and so fails under ``jax_numpy_dtype_promotion="strict"``. With
    ``lr_schedule="cosine"`` or ``warmup_steps > 0``: `warmup_schedule`.
    """
    if config.lr_schedule != "piecewise" or config.warmup_steps:
        return warmup_schedule(config)
    boundaries = sorted(int(b) for b in config.lr_boundaries)
    values = [config.learning_rate * config.lr_decay**k for k in range(len(boundaries) + 1)]

    def schedule(count):
        if not boundaries:
            return jnp.asarray(values[0], jnp.float32)
        passed = jnp.sum(jnp.asarray(count, jnp.int32) >= jnp.asarray(boundaries, jnp.int32))
        return jnp.asarray(values, jnp.float32)[passed]

    return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """SGD + momentum with masked weight decay added to the gradient before momentum.

    With ``optimizer="adamw"``: `adamw`. With ``grad_clip_norm``: the gradient is first clipped
    to that global norm (`optax.clip_by_global_norm`), before weight decay and momentum.
    """
    check_optimizer_options(config)
    if config.optimizer == "adamw":
        tx = adamw(config)
    else:
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
            optax.sgd(learning_rate_schedule(config), momentum=config.momentum),
        )
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


# --------------------------------------------------------------------------------------------
# Optimizer options for transformers (AdamW, warmup + cosine, label smoothing, clipping)
# --------------------------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("piecewise", "cosine")


def check_optimizer_options(config: TrainConfig) -> None:
    """Raises a ValueError naming the field and the fix for a bad optimizer / loss option."""

    def bad(field, why):
        raise ValueError(f"TrainConfig.{field}={getattr(config, field)!r}: {why}")

    if config.optimizer not in OPTIMIZERS:
        bad("optimizer", f"use one of {OPTIMIZERS}.")
    if config.lr_schedule not in LR_SCHEDULES:
        bad("lr_schedule", f"use one of {LR_SCHEDULES}.")
    if isinstance(config.warmup_steps, bool) or not isinstance(config.warmup_steps, int) or (
        config.warmup_steps < 0
    ):
        bad("warmup_steps", "must be an int >= 0 (0: no warmup).")
    if config.lr_schedule == "cosine" and config.warmup_steps >= config.num_steps:
        bad("warmup_steps", f"must be below num_steps={config.num_steps} for the cosine decay.")
    if not 0.0 <= config.label_smoothing < 1.0:
        bad("label_smoothing", "must lie in [0, 1) (0: plain labels).")
    if config.grad_clip_norm is not None and not config.grad_clip_norm > 0:
        bad("grad_clip_norm", "must be a positive global norm, or None for no clipping.")
    for field in ("adam_b1", "adam_b2"):
        if not 0.0 <= getattr(config, field) < 1.0:
            bad(field, "must lie in [0, 1).")
    if not config.adam_eps > 0:
        bad("adam_eps", "must be positive.")
    if config.compute_dtype is not None:
        try:
            floating = jnp.issubdtype(jnp.dtype(config.compute_dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            bad("compute_dtype", "use a float dtype name such as 'bfloat16', or None.")


def warmup_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup, then the piecewise or the cosine schedule.

    ``lr(t) = base(t) * min(t / warmup_steps, 1)``; the cosine base is
    ``end + (lr - end) * (1 + cos(pi * s)) / 2`` with ``s = (t - warmup) / (num_steps - warmup)``
    clipped to [0, 1]: the values of `optax.warmup_cosine_decay_schedule` (init 0, peak
    ``learning_rate``, ``decay_steps=num_steps``), written without mixing int and float dtypes,
    which ``jax_numpy_dtype_promotion="strict"`` rejects.
    """
    warmup = int(config.warmup_steps)
    peak, end = float(config.learning_rate), float(config.end_learning_rate)
    if config.lr_schedule == "cosine":
        span = float(max(config.num_steps - warmup, 1))

        def base(count):
            s = jnp.clip((count.astype(jnp.float32) - float(warmup)) / span, 0.0, 1.0)
            return end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * s))

    else:
        base = learning_rate_schedule(dataclasses.replace(config, warmup_steps=0))

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        lr = jnp.asarray(base(count), jnp.float32)
        if warmup:
            lr = lr * jnp.minimum(count.astype(jnp.float32) / float(warmup), 1.0)
        return lr

    return schedule


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``tx.update`` under standard dtype promotion.

    optax's Adam bias correction computes ``b1 ** count`` (a Python float and an int32 count),
    which ``jax_numpy_dtype_promotion="strict"`` (the test suite's setting) rejects.
    """

    def update(updates, state, params=None, **extra):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra)

    return optax.GradientTransformation(tx.init, update)


def adamw(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on kernels only (`weight_decay_mask`).

    ``w -= lr_t * (adam_update + weight_decay * w)`` for conv and dense kernels; biases,
    LayerNorm / BatchNorm scales and offsets, position embeddings and class tokens are not
    decayed (their leaves are not named ``kernel``), as in timm / DeiT.
    """
    return _standard_promotion(
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against integer labels, optionally label-smoothed.

    With smoothing ``a`` the target is ``(1 - a) * one_hot + a / classes``
    (`optax.smooth_labels`); ``a = 0`` is `optax.softmax_cross_entropy_with_integer_labels`.
    """
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))


# --------------------------------------------------------------------------------------------
# Model, state and steps
# --------------------------------------------------------------------------------------------


def build_model(name: str, overrides: Mapping[str, Any], num_classes: int, in_channels: int,
                seed: int) -> nnx.Module:
    """Builds a preset of `revjax.models` by name."""
    presets = _model_presets()
    if name not in presets:
        raise ValueError(f"Unknown model preset {name!r}. Known presets: {', '.join(presets)}.")
    preset = getattr(models if hasattr(models, name) else vit, name)
    overrides = dict(overrides)
    overrides.setdefault("in_channels", in_channels)
    return preset(num_classes, rngs=nnx.Rngs(seed), **overrides)


def _model_overrides(config: TrainConfig) -> dict[str, Any]:
    """``model_overrides`` plus what other options imply: the compute dtype (reversible models
    keep float32 streams) and a transformer's image size."""
    overrides = dict(config.model_overrides)
    if config.compute_dtype is not None:
        overrides.setdefault("dtype", jnp.dtype(config.compute_dtype))
        if config.model.startswith("rev"):
            overrides.setdefault("carry_dtype", jnp.float32)
    for name in ("arithmetic", "frac_bits"):
        if getattr(config, name) is not None and config.model.startswith("rev"):
            overrides.setdefault(name, getattr(config, name))
    if config.image_size is not None and config.model in vit.__all__:
        overrides.setdefault("image_size", config.image_size)
    return overrides


def create_train_state(
    config: TrainConfig, num_classes: int, in_channels: int
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """Builds the model and optimizer; returns ``(graphdef, state, tx)``.

    The NNX graph is split once here: training steps then work on pure pytrees.
    """
    model = build_model(config.model, _model_overrides(config), num_classes, in_channels,
                        config.seed)
    # Everything that is not a Param rides in `batch_stats`: BatchNorm statistics and model
    # constants such as the ViTs' block indices (for the RevNet zoo: `models.functional`).
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )
    return graphdef, state, tx


def _apply(graphdef, params, batch_stats, x, *, train, key=None):
    """`models.apply` for any model: returns every non-Param variable after the call, and gives
    ``key`` to models that draw random numbers in training (dropout, drop-path: `revjax.ViT` /
    `revjax.RevViT`); other models never see it."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    if train and key is not None and getattr(model, "uses_dropout_rng", False):
        logits = model(x, train=True, rngs=key)
    else:
        logits = model(x, train=train)
    return logits, nnx.state(model, nnx.Not(nnx.Param))


def _loss_and_metrics(graphdef, params, batch_stats, batch, train, key=None, label_smoothing=0.0):
    logits, new_stats = _apply(graphdef, params, batch_stats, batch["image"], train=train, key=key)
    logits = logits.astype(jnp.float32)
    losses = cross_entropy(logits, batch["label"], label_smoothing)
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    return losses, correct, new_stats


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    seed: int = 0,
) -> Callable:
    """Returns the pure step ``(state, batch) -> (state, metrics)`` (not yet jitted).

    Args:
      graphdef: the model's static part (`revjax.models.functional`).
      tx: the optimizer.
      label_smoothing: smoothing of the training targets (`cross_entropy`); the reported loss
        is the smoothed one.
      seed: models with dropout / drop-path get the key ``fold_in(fold_in(key(seed), 1),
        step)``: a function of the step, so a resumed run draws the same masks.
    """

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), state.step)

        def loss_fn(params):
            losses, correct, new_stats = _loss_and_metrics(
                graphdef, params, state.batch_stats, batch, train=True, key=key,
                label_smoothing=label_smoothing,
            )
            return jnp.mean(losses), (jnp.mean(correct), new_stats)

        (loss, (accuracy, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, {"loss": loss, "accuracy": accuracy}

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """Returns ``(state, batch) -> {"correct", "loss", "count"}`` sums over the masked batch."""

    def eval_step(state: TrainState, batch: Mapping[str, jax.Array]):
        losses, correct, _ = _loss_and_metrics(
            graphdef, state.params, state.batch_stats, batch, train=False
        )
        mask = batch["mask"]
        return {
            "correct": jnp.sum(correct * mask),
            "loss": jnp.sum(losses * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when a multi-process environment is configured.

    By hand (e.g. two processes on one machine): set ``JAX_COORDINATOR_ADDRESS=host:port``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` in each process.
    """
    markers = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
    multi = any(os.environ.get(m) for m in markers) or (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if multi and not jax.distributed.is_initialized():
        # JAX reads the coordinator address from the environment but not these two (outside
        # SLURM / Open MPI / Kubernetes / Cloud TPU, which it detects itself).
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            num_processes=int(count) if count else None, process_id=int(index) if index else None
        )


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over every device (or the first ``num_devices`` local ones)."""
    devices = jax.devices()
    if num_devices is not None:
        if jax.process_count() > 1:
            raise ValueError("num_devices selects local devices; leave it None with multi-host.")
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices}, but {len(devices)} devices exist.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises a clear error when the global batch does not split evenly over the devices."""
    n = mesh.devices.size
    if batch_size % n:
        lower = batch_size // n * n
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {n} devices of the data-parallel mesh. "
            f"Use a multiple of {n} (e.g. {max(lower, n)} or {lower + n}), or fewer devices "
            "(TrainConfig.num_devices)."
        )


def _global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's part of the batch into one global array per key (arrays that
    are already global `jax.Array`s, from the device pipeline, pass through)."""
    return {
        k: v if isinstance(v, jax.Array)
        else jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local.items()
    }


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------

INPUT_PIPELINES = ("auto", "device", "grain")


def resolve_input_pipeline(config: TrainConfig) -> str:
    """``"device"`` or ``"grain"`` for ``config`` (``"auto"``: device where the dataset supports
    it; `make_train_input` then also checks that it fits in device memory)."""
    from revjax import data

    choice = config.input_pipeline
    if choice not in INPUT_PIPELINES:
        raise ValueError(
            f"input_pipeline={choice!r}; use one of {', '.join(map(repr, INPUT_PIPELINES))}."
        )
    supported = config.dataset in data.DEVICE_DATASETS
    if choice == "device" and not supported:
        raise ValueError(
            f"input_pipeline='device' supports {', '.join(data.DEVICE_DATASETS)}, not "
            f"{config.dataset!r} (it does not fit in device memory); use input_pipeline='grain'."
        )
    if choice == "auto":
        return "device" if supported else "grain"
    return choice


def make_train_input(config: TrainConfig, mesh: Mesh, image_size: int):
    """The training input of ``config``: a `revjax.data.DeviceTrainInput` or
    `revjax.data.GrainTrainInput` (same interface: ``wrap_step``, ``step_args``,
    ``arg_shardings``, ``batch_at``, ``get_state`` / ``set_state``, ``close``)."""
    from revjax import data

    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    if resolve_input_pipeline(config) == "device":
        info = data.get_dataset_info(config.dataset)
        arrays = data.load_split(config.dataset, info.train_split, config.data_dir, image_size)
        nbytes = arrays[0].nbytes + arrays[1].nbytes
        if config.input_pipeline == "device" or data.fits_on_devices(nbytes):
            return data.DeviceTrainInput(
                config.dataset, batch_size=config.batch_size, seed=config.seed,
                batch_sharding=batch_sharding, data_dir=config.data_dir, arrays=arrays,
            )
        _log.warning("The %s training split (%d bytes) does not fit beside the model on every "
                     "device: using the Grain pipeline", config.dataset, nbytes)
    it = data.train_iterator(
        config.dataset, batch_size=config.batch_size, seed=config.seed,
        data_dir=config.data_dir, image_size=image_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.num_workers,
    )
    return data.GrainTrainInput(it, batch_sharding, config.prefetch)


def make_eval_input(config: TrainConfig, mesh: Mesh, image_size: int, kind: str,
                    batch_size: int) -> Callable[[], Iterator]:
    """A function returning one pass over the evaluation split as global masked batches:
    resident on the devices when ``kind == "device"``, else through Grain."""
    from revjax import data

    if kind == "device":
        resident = data.DeviceEvalInput(
            config.dataset, batch_size=batch_size, batch_sharding=NamedSharding(mesh, P(DATA_AXIS)),
            data_dir=config.data_dir, image_size=image_size,
        )
        return lambda: iter(resident)
    return lambda: data.eval_iterator(
        config.dataset, batch_size=batch_size, data_dir=config.data_dir, image_size=image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.num_workers,
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


# Orbax manager, atomic save, and a restore that skips damaged checkpoints and names
# mismatched ones: revjax/_resilience.py.
_checkpoint_manager = checkpoint_manager
_save = save


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


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


def _host_rss_bytes() -> int | None:
    """This process's resident host memory (Linux), for leak checks (experiments/bench_soak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _progress(total: int, initial: int):
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
    batch_size: int | None = None,
) -> dict[str, int]:
    """Compiled temp bytes of one train step for the model, the same model with memory saving
    off, and the twin (if configured).

    Compiles on abstract shapes; nothing runs. Scans are compiled rolled (``unroll=1``), the
    GPU/TPU configuration, so the figure is the one an accelerator sees even when measured on
    CPU (where training itself runs unrolled for speed; see `revjax.default_unroll`).
    """
    batch_size = batch_size or config.batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    rolled = {"unroll": 1}
    variants = {"model": (config.model, {**config.model_overrides, **rolled})}
    if config.model.startswith(("revnet", "revvit")):
        variants["model_plain"] = (
            config.model, {**config.model_overrides, **rolled, "memory_saving": False}
        )
    if config.twin_model:
        variants["twin"] = (config.twin_model, {**config.twin_overrides, **rolled})
    out = {}
    for key, (name, overrides) in variants.items():
        cfg = dataclasses.replace(config, model=name, model_overrides=overrides)
        graphdef, state, tx = _abstract_state(cfg, num_classes, in_channels)
        step = jax.jit(make_train_step(graphdef, tx, **_step_options(config)))
        out[key] = compiled_memory(step, state, batch)["temp"]
    return out


def _step_options(config: TrainConfig) -> dict[str, Any]:
    """The `make_train_step` keywords a config implies."""
    return {"label_smoothing": config.label_smoothing, "seed": config.seed}


def _abstract_state(cfg, num_classes, in_channels):
    """Shapes of the train state without allocating it."""
    holder = {}

    def build():
        graphdef, state, tx = create_train_state(cfg, num_classes, in_channels)
        holder["graphdef"], holder["tx"] = graphdef, tx
        return state

    state = jax.eval_shape(build)
    return holder["graphdef"], state, holder["tx"]


def format_memory_report(mem: Mapping[str, int], config: TrainConfig) -> str:
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


# --------------------------------------------------------------------------------------------
# Evaluation and the loop
# --------------------------------------------------------------------------------------------


def evaluate(eval_step: Callable, state: TrainState, batches: Iterator, sharding) -> dict:
    """Exact accuracy and loss over a masked, padded evaluation stream."""
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for local in batches:
        out = eval_step(state, _global_batch(local, sharding))
        for k in totals:
            totals[k] += float(out[k])
    count = max(totals["count"], 1.0)
    return {"eval_accuracy": totals["correct"] / count, "eval_loss": totals["loss"] / count}


def _first_non_finite(pending: list[tuple[int, jax.Array]]) -> int | None:
    for step, loss in pending:
        if not np.isfinite(float(loss)):
            return step
    return None


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
    pidx = jax.process_index()

    # Fails early, with the prepare command, if data are missing.
    train_input = make_train_input(config, mesh, image_size)
    eval_iter = make_eval_input(config, mesh, image_size, train_input.kind, eval_batch_size)

    graphdef, state, tx = create_train_state(config, info.num_classes, info.image_shape[2])
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    state = jax.device_put(state, replicated)

    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    start, latest = 0, None
    try:
        restored = restore_latest(manager, state, workdir)  # skips damaged, names mismatched
    except BaseException:
        manager.close()
        raise
    if restored is not None:
        latest, state, data_state = restored
        state = jax.device_put(state, replicated)
        train_input.set_state(data_state)
        start = int(latest)
        _log.info("Resumed from step %d in %s", start, workdir)

    train_step = jax.jit(
        train_input.wrap_step(make_train_step(graphdef, tx, **_step_options(config))),
        in_shardings=(replicated, *train_input.arg_shardings()),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(graphdef), in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )

    writer = MetricWriter(workdir)
    result: dict[str, Any] = {}
    if config.memory_report and start == 0:
        mem = train_step_memory(config, info.num_classes, info.image_shape[2], info.image_shape)
        result["memory"] = mem
        if pidx == 0:
            print(format_memory_report(mem, config), flush=True)
        writer.write(0, {f"compiled_temp_bytes/{k}": v for k, v in mem.items()})

    drift_monitor = None
    if config.drift_every:
        from revjax.drift import DriftMonitor

        drift_monitor = DriftMonitor(graphdef, threshold=config.drift_threshold)

    schedule = learning_rate_schedule(config)
    pending: list[tuple[int, jax.Array]] = []
    window: list[dict[str, jax.Array]] = []
    window_start = time.perf_counter()
    images_per_second = float("nan")
    bar = _progress(config.num_steps, start)
    last_saved = start if latest is not None else None
    step = start

    def check_finite():
        bad = _first_non_finite(pending)
        pending.clear()
        check_carry_range(state.batch_stats)  # fixed-point carries out of range: named
        if bad is not None:
            raise NonFiniteLossError(bad, workdir)

    stop = StopSignals(config.preemption_sync_every)  # SIGTERM/SIGINT: save, then stop
    stop.install()
    try:
        while step < config.num_steps:
            state, metrics = train_step(state, *train_input.step_args(step))
            step += 1
            pending.append((step, metrics["loss"]))
            window.append(metrics)
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == config.num_steps:
                check_finite()
                elapsed = time.perf_counter() - window_start
                images_per_second = len(window) * config.batch_size / max(elapsed, 1e-9)
                record = {
                    "train_loss": float(np.mean([float(m["loss"]) for m in window])),
                    "train_accuracy": float(np.mean([float(m["accuracy"]) for m in window])),
                    "learning_rate": float(schedule(step - 1)),
                    "images_per_second": images_per_second,
                }
                rss = _host_rss_bytes()
                if rss is not None:
                    record["host_rss_bytes"] = rss
                peak = device_peak_bytes()
                if peak is not None:
                    record["peak_device_bytes"] = peak
                writer.write(step, record)
                result.update(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                    acc=f"{record['train_accuracy']:.3f}")
                window.clear()
                window_start = time.perf_counter()
            if drift_monitor is not None and step % config.drift_every == 0:
                image = train_input.batch_at(step - 1)["image"]
                drift = drift_monitor.check(state.params, state.batch_stats, image)
                writer.write(step, {f"drift/{k}": v for k, v in drift.items()})
            if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
                record = evaluate(eval_step, state, eval_iter(), batch_sharding)
                writer.write(step, record)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                check_finite()
                _save(manager, step, state, train_input.get_state())
                last_saved = step
            signum = stop.agreed(step)  # the same decision on every process
            if signum is not None:
                check_finite()
                if last_saved != step:
                    _save(manager, step, state, train_input.get_state())
                raise Preempted(step, signum, workdir)
        check_finite()
        if last_saved != step:
            _save(manager, step, state, train_input.get_state())
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        manager.close()
        train_input.close()

    record = evaluate(eval_step, state, eval_iter(), batch_sharding)
    writer.write(step, record)
    writer.close()
    result.update(record)
    result["step"] = step
    result["state"] = state
    return result
