"""`TrainConfig`, the description of one training run, and its validation table.

Adding a field is one edit here: the field (with its default and a line in the docstring) and
its entry in `FIELD_CHECKS` (type, range or known names); a rule that involves several fields
goes in `CROSS_CHECKS`. A bad value raises `ConfigError` when the config is made.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from revjax import presets
from revjax._partition import MESH_AXES
from revjax.vit import RevViT, ViT

__all__ = [
    "CROSS_CHECKS",
    "FIELD_CHECKS",
    "INPUT_PIPELINES",
    "LR_SCHEDULE_NAMES",
    "OPTIMIZER_NAMES",
    "WARMUP_STARTS",
    "ConfigError",
    "TrainConfig",
    "check_init_from",
    "validate_config",
]

# The names `TrainConfig.input_pipeline`, `optimizer`, `lr_schedule` and `warmup_start` accept.
# The trainer's modules implement one entry per name (`revjax.train.inputs.resolve_input_pipeline`,
# `revjax.train.optim.OPTIMIZERS`, `LR_SCHEDULES` and `WARMUP_OFFSETS`); this module imports none
# of them.
INPUT_PIPELINES: tuple[str, ...] = ("auto", "device", "grain", "dali")
OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adamw")
LR_SCHEDULE_NAMES: tuple[str, ...] = ("piecewise", "cosine")
WARMUP_STARTS: tuple[str, ...] = ("zero", "nanogpt")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the configs in `experiments/configs/` build these.

    Every field is checked (type, range, known names) when the config is made, so a bad value
    raises `ConfigError` naming the field and the fix before anything runs.

    Attributes:
      model: a preset name from `revjax.models` (``"revnet38"``, ``"resnet32"``, ...).
      model_overrides: extra constructor arguments for the preset (widths, memory_saving, ...).
      twin_model: the preset compared against for the memory report (e.g. ResNet-32 for
        RevNet-38); ``None`` skips it.
      twin_overrides: constructor arguments for the twin.
      dataset: a name from `revjax.data.KNOWN_DATASETS`, or a text dataset of
        `revjax.data.text.TEXT_DATASETS` (``"shakespeare_char"``...) for a language model
        (`revjax.GPT` / `revjax.RevGPT` presets: windows of the model's context, next-token
        cross-entropy, validation loss and perplexity).
      data_dir: TFDS data directory (``None``: TFDS default).
      image_size: image side length (``None``: the dataset's).
      batch_size: global batch size (over all devices and processes).
      eval_batch_size: global evaluation batch size (``None``: ``batch_size``).
      num_steps: optimizer steps.
      learning_rate: initial learning rate.
      lr_boundaries: steps at which the learning rate is multiplied by ``lr_decay``.
      lr_decay: the factor at each boundary.
      momentum: SGD momentum.
      weight_decay: L2 coefficient added to the gradient of conv and dense kernels (a
        language model's: also of its token and position embeddings, as nanoGPT;
        `revjax.train.weight_decay_mask`).
      log_every: steps between train-metric records.
      eval_every: steps between evaluations (0: only at the end).
      checkpoint_every: steps between checkpoints (0: only at the end).
      keep_checkpoints: how many checkpoints to keep.
      seed: seed of initialisation, data order and augmentation.
      num_devices: use the first n local devices (``None``: every device).
      mesh: sizes of the device mesh's ``data``, ``fsdp`` and ``tensor`` axes, as a tuple
        ``(data, fsdp, tensor)`` or a dict of some of them (the others 1), e.g.
        ``{"fsdp": 8}``; their product is the number of devices. ``data`` replicates the
        parameters and splits the batch, ``fsdp`` splits the batch and every large parameter
        with its optimizer state, ``tensor`` splits attention heads and MLP hidden units
        (`revjax.train.sharding`). ``None``: pure data parallelism over every device.
      num_workers: Grain worker processes for the input pipeline.
      memory_report: print and record compiled train-step memory vs plain / twin at start.
      drift_every: steps between drift-monitor checks of the reversible stages (0: off).
      drift_threshold: max relative reconstruction error above which the monitor warns.
      input_pipeline: ``"device"``: the training split lives in device memory and each batch is
        shuffled and augmented inside the jitted train step (CIFAR, digits; see
        `revjax.data.device_pipeline`); ``"grain"``: Grain workers on the host and device
        prefetch (every dataset; for ImageNet uint8 crops decoded at reduced scale, flipped,
        jittered and scaled inside the step, `revjax.data.imagenet`); ``"dali"``: ImageNet
        decoded on NVIDIA GPUs by DALI (``pip install -e '.[dali]'``,
        `revjax.data.dali_pipeline`); ``"auto"``: device where the dataset supports it and
        fits, DALI for ImageNet on NVIDIA GPUs where installed, else Grain. The pipelines give
        different (equally random) orders or pixels, so a run resumes only with the pipeline it
        started with.
      prefetch: batches the Grain pipeline copies to the devices ahead of the step.
      preemption_sync_every: with several processes, steps between their agreement on a
        SIGTERM/SIGINT (one all-gather of an int); one process checks after every step for free.
      optimizer: ``"sgd"`` (the paper's recipe) or ``"adamw"`` (Adam with decoupled weight decay,
        Loshchilov & Hutter: each step also subtracts ``lr_t * weight_decay * w`` from the
        decayed leaves, outside the adaptive scaling; ``weight_decay`` then means that
        coefficient).
      adam_b1: AdamW's first-moment decay.
      adam_b2: AdamW's second-moment decay.
      adam_eps: AdamW's epsilon.
      lr_schedule: ``"piecewise"`` (``lr_boundaries`` / ``lr_decay``) or ``"cosine"`` (from
        ``learning_rate`` after the warmup to ``end_learning_rate`` at ``num_steps``).
      warmup_steps: linear warmup to the schedule over the first steps (0: none).
      warmup_start: where the warmup starts: ``"zero"`` (step t of the warmup runs at
        ``t / warmup_steps`` of the schedule's rate, step 0 at 0, as optax's
        ``warmup_cosine_decay_schedule``) or ``"nanogpt"`` (``(t + 1) / (warmup_steps + 1)``,
        step 0 above 0, as nanoGPT's train.py); the full rate from step ``warmup_steps`` on.
      end_learning_rate: the cosine schedule's final value.
      label_smoothing: training targets ``(1 - a) * one_hot + a / classes`` (0: plain labels;
        evaluation always reports the plain cross-entropy).
      grad_clip_norm: clip the gradient to this global L2 norm before the optimizer (``None``:
        off).
      compute_dtype: ``"bfloat16"`` (or another float dtype name) for the model's compute
        dtype, with float32 parameters and, in reversible models, float32 streams
        (``carry_dtype``); ``None``: the model's default. ``model_overrides`` take precedence.
      arithmetic: reversible models' carry arithmetic, ``"float"`` or ``"fixed"`` (exact,
        int32 fixed point; see `revjax.reversible_sequence`); ``None``: the model's default
        (fixed for RevNet and RevViT). ``model_overrides`` take precedence.
      frac_bits: fraction bits of fixed-point carries; ``None``: the model's default (16).
      init_from: a pretrained ViT checkpoint to start from (ViT / RevViT presets): timm
        ``.safetensors`` / ``.pth`` / ``.bin`` or big_vision ``.npz`` (`revjax.finetune.init_from`:
        a RevViT gets the ViT's blocks through `RevViT.from_vit`; another number of classes
        keeps the model's new head); for GPT / RevGPT presets a GPT-2 ``model.safetensors``
        (a RevGPT gets it through `RevGPT.from_gpt`). A resumed run restores its own
        checkpoint over it. ``None``: the initialisation.
      layer_decay: layer-wise learning-rate decay (ViT / RevViT presets;
        `revjax.finetune.scale_by_layer_decay`): block i of n learns at
        ``layer_decay ** (n - i)`` times the head's rate; ``None``: off.
      freeze: parts whose parameters never change (`revjax.finetune.freeze`), e.g.
        ``("embed",)`` for the patch and position embedding.
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
    mesh: tuple[int, int, int] | None = None
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
    warmup_start: str = "zero"
    end_learning_rate: float = 0.0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    compute_dtype: str | None = None
    arithmetic: str | None = None
    frac_bits: int | None = None
    # Fine-tuning options (defaults: from the initialisation, one learning rate, all trained).
    init_from: str | None = None
    layer_decay: float | None = None
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        validate_config(self)


# --------------------------------------------------------------------------------------------
# Validation: one line per field in FIELD_CHECKS (a test fails when a field has none), and the
# rules that involve several fields in CROSS_CHECKS; both run when the config is made.
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A `TrainConfig` value has the wrong type, range or name; the message says the fix.

    ``problem`` is what is wrong; ``fixes`` the settings that would fix it (``"key=value"``
    texts, empty when the problem text says the fix), so a command line can name them in its
    own syntax (``--set key=value``).
    """

    def __init__(self, problem: str, fixes: tuple[str, ...] = ()):
        self.problem, self.fixes = problem, tuple(fixes)
        super().__init__(f"{problem}; use {_one_of(self.fixes)}." if fixes else problem)


def _one_of(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _dataset_names() -> list[str] | None:
    try:
        from revjax.data import KNOWN_DATASETS  # needs the experiments extra (Grain)
    except ImportError:
        return None
    from revjax.data.text import TEXT_DATASETS

    return list(KNOWN_DATASETS) + list(TEXT_DATASETS)


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


def _checkpoint_file(v):
    suffixes = (".safetensors", ".pth", ".pt", ".bin", ".npz")
    if v is None:
        return None
    if not isinstance(v, str | os.PathLike) or not os.fspath(v).lower().endswith(suffixes):
        raise _Bad(f"a checkpoint file path ending in {', '.join(suffixes)}, or None")
    return os.fspath(v)


def _part_names(v):
    if isinstance(v, str) or not isinstance(v, tuple | list) or not all(
        isinstance(p, str) for p in v
    ):
        raise _Bad("a tuple of part names, e.g. ('embed',) or ('embed', 'attn'), or ()")
    return tuple(v)


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


def _mesh(v):
    if v is None:
        return None
    bad = _Bad(f"None, a tuple of {len(MESH_AXES)} axis sizes >= 1 ({', '.join(MESH_AXES)}), "
               "e.g. (1, 8, 1), or a dict of some of them, e.g. {'fsdp': 8}")
    if isinstance(v, Mapping):
        if not set(v) <= set(MESH_AXES):
            raise bad
        v = tuple(v.get(axis, 1) for axis in MESH_AXES)
    if isinstance(v, str) or not isinstance(v, tuple | list) or len(v) != len(MESH_AXES):
        raise bad
    if not all(_is_int(size) and size >= 1 for size in v):
        raise bad
    return tuple(int(size) for size in v)


FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "model": _name(presets.names, "model preset"),
    "model_overrides": _mapping,
    "twin_model": _name(presets.names, "model preset", optional=True),
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
    "mesh": _mesh,
    "num_workers": _integer(0),
    "memory_report": _boolean,
    "drift_every": _integer(0),
    "drift_threshold": _number(0.0, open_min=True),
    "input_pipeline": _name(lambda: list(INPUT_PIPELINES), "input pipeline"),
    "prefetch": _integer(0),
    "preemption_sync_every": _integer(1),
    "optimizer": _name(lambda: list(OPTIMIZER_NAMES), "optimizer"),
    "adam_b1": _number(0.0, 1.0, open_max=True),
    "adam_b2": _number(0.0, 1.0, open_max=True),
    "adam_eps": _number(0.0, open_min=True),
    "lr_schedule": _name(lambda: list(LR_SCHEDULE_NAMES), "learning-rate schedule"),
    "warmup_steps": _integer(0),
    "warmup_start": _name(lambda: list(WARMUP_STARTS), "warmup start"),
    "end_learning_rate": _number(0.0),
    "label_smoothing": _number(0.0, 1.0, open_max=True),
    "grad_clip_norm": _optional(_number(0.0, open_min=True)),
    "compute_dtype": _optional(_float_dtype_name),
    "arithmetic": _name(lambda: ["float", "fixed"], "carry arithmetic", optional=True),
    "frac_bits": _integer(0, optional=True),
    "init_from": _checkpoint_file,
    "layer_decay": _optional(_number(0.0, 1.0, open_min=True)),
    "freeze": _part_names,
}


def _warmup_below_cosine_end(config: TrainConfig) -> str | None:
    if config.lr_schedule == "cosine" and config.warmup_steps >= config.num_steps:
        return (
            f"warmup_steps={config.warmup_steps} is invalid: expected a value below "
            f"num_steps={config.num_steps} for the cosine decay"
        )
    return None


def _fine_tuning_needs_a_vit(config: TrainConfig) -> str | None:
    cls = presets.get(config.model).cls
    language_model = presets.get(config.model).accepts("vocab_size")  # GPT / RevGPT
    if config.init_from is not None and not (issubclass(cls, ViT | RevViT) or language_model):
        return (
            f"init_from needs a ViT, RevViT, GPT or RevGPT preset (pretrained ViT and GPT-2 "
            f"checkpoints load into those), got model={config.model!r}"
        )
    if config.layer_decay is not None and not issubclass(cls, ViT | RevViT):
        return (
            f"layer_decay and its per-block rates need a ViT or RevViT preset (layer-wise decay "
            f"is defined for their blocks), got model={config.model!r}"
        )
    return None


def _text_goes_with_a_language_model(config: TrainConfig) -> str | None:
    try:  # `revjax.data` needs the experiments extra (Grain); without it no dataset is read,
        # and a config only builds a step (the ahead-of-time compile venvs install revjax alone)
        from revjax.data.text import TEXT_DATASETS
    except ImportError:
        return None

    language_model = presets.get(config.model).accepts("vocab_size")
    if (config.dataset in TEXT_DATASETS) != language_model:
        return (
            f"model={config.model!r} does not read dataset={config.dataset!r}: text datasets "
            f"({', '.join(TEXT_DATASETS)}) train language models (GPT / RevGPT presets), image "
            "datasets the image models"
        )
    return None


def _mesh_matches_num_devices(config: TrainConfig) -> str | None:
    if config.mesh is None or config.num_devices is None:
        return None
    size = math.prod(config.mesh)
    if size != config.num_devices:
        return (
            f"mesh={config.mesh} spans {size} devices but num_devices={config.num_devices}; "
            f"use num_devices={size} or a mesh whose sizes multiply to {config.num_devices}"
        )
    return None


# Rules over several fields, checked after every field passed its own check: each returns the
# problem text (naming the fields and the fix) or None.
CROSS_CHECKS: tuple[Callable[[TrainConfig], str | None], ...] = (
    _warmup_below_cosine_end,
    _fine_tuning_needs_a_vit,
    _text_goes_with_a_language_model,
    _mesh_matches_num_devices,
)


def validate_config(config: TrainConfig) -> None:
    """Checks (and normalises: numpy scalars to Python, lists to tuples) every field, then the
    rules over several fields; raises `ConfigError` listing every problem."""
    problems = []
    for field in dataclasses.fields(config):
        check = FIELD_CHECKS.get(field.name)
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
    if not problems:
        problems = [p for p in (rule(config) for rule in CROSS_CHECKS) if p is not None]
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def check_init_from(config: TrainConfig) -> None:
    """Raises `ConfigError` when ``config.init_from`` names no existing file (checked when a run
    starts, before anything is written; a config is made without looking at the disk)."""
    if config.init_from is not None and not os.path.isfile(config.init_from):
        raise ConfigError(
            f"init_from={config.init_from!r} is not a file (relative paths start in "
            f"{os.getcwd()}): make the checkpoint first or point init_from at one",
            fixes=("init_from=PATH",),
        )
