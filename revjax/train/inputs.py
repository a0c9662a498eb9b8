"""Devices and input: the device mesh, batch-size checks, and the choice of input pipeline
(device-resident, Grain, or for ImageNet on NVIDIA GPUs DALI).

The mesh spans every device (all processes) with three named axes, ``data``, ``fsdp`` and
``tensor`` (`TrainConfig.mesh`; by default all devices on ``data``: pure data parallelism). The
batch is split over ``data x fsdp``; the parameters are placed by `revjax.train.sharding`. XLA
partitions the jitted step, so BatchNorm statistics are computed over the **global** batch,
exactly as on one device. With several processes, `jax.distributed.initialize()` is called when
the usual environment variables are present and each process reads its own shard of the data.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from revjax._partition import BATCH_AXES, MESH_AXES
from revjax.train.config import ConfigError, TrainConfig
from revjax.train.sharding import batch_sharding

__all__ = [
    "DATA_AXIS",
    "TEXT_EVAL_WINDOWS",
    "check_batch_size",
    "dataset_info",
    "is_text",
    "lm_context",
    "make_eval_input",
    "make_mesh",
    "make_train_input",
    "maybe_initialize_distributed",
    "resolve_input_pipeline",
]

_log = logging.getLogger(__name__)

DATA_AXIS = "data"


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


def make_mesh(num_devices: int | None = None, shape: tuple[int, ...] | None = None) -> Mesh:
    """The device mesh with axes ``("data", "fsdp", "tensor")`` (`MESH_AXES`).

    Args:
      num_devices: use the first ``num_devices`` local devices (one process only); ``None``:
        every device of every process.
      shape: the axes' sizes ``(data, fsdp, tensor)`` (`TrainConfig.mesh`); ``None``: every
        device on ``data``.

    Raises:
      ConfigError: more devices asked for than exist, or a shape that does not multiply to the
        number of devices (naming shapes that do).
    """
    devices = jax.devices()
    if num_devices is not None:
        if jax.process_count() > 1:
            raise ConfigError("num_devices selects local devices; it must be None with several "
                              "processes", fixes=("num_devices=None",))
        if not 1 <= num_devices <= len(devices):
            raise ConfigError(f"num_devices={num_devices}, but {len(devices)} devices exist",
                              fixes=(f"num_devices={len(devices)}", "num_devices=None"))
        devices = devices[:num_devices]
    n = len(devices)
    shape = (n, 1, 1) if shape is None else tuple(shape)
    if math.prod(shape) != n:
        _, fsdp, tensor = shape
        shapes = ((n // (fsdp * tensor), fsdp, tensor), (1, n // tensor, tensor), (1, n, 1))
        fixes = dict.fromkeys(f"mesh={fix}" for fix in shapes if math.prod(fix) == n)
        raise ConfigError(f"mesh={shape} spans {math.prod(shape)} devices, but {n} are used "
                          "(every device of every process, or num_devices)", fixes=tuple(fixes))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises `revjax.train.ConfigError` when the global batch does not split evenly over the
    mesh's batch axes (``data x fsdp``), naming the settings that fix it (``what``,
    ``num_devices`` or ``mesh``)."""
    shape = dict(mesh.shape)
    n = math.prod(shape.get(axis, 1) for axis in BATCH_AXES)
    if batch_size % n:
        lower = batch_size // n * n
        fixes = [f"{what}={size}" for size in dict.fromkeys((max(lower, n), lower + n))]
        if mesh.devices.size == n and jax.process_count() == 1:  # one process, no fsdp/tensor
            fixes.append(f"num_devices={max(d for d in range(1, n) if batch_size % d == 0)}")
        split = " x ".join(f"{axis} {shape[axis]}" for axis in BATCH_AXES if axis in shape)
        where = (f"the {n} devices of the data-parallel mesh" if mesh.devices.size == n
                 else f"the {n} batch shards of the mesh ({split})")
        raise ConfigError(
            f"{what}={batch_size} is not divisible by {where}",
            fixes=tuple(fixes),
        )


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------

def resolve_input_pipeline(config: TrainConfig) -> str:
    """``"device"``, ``"grain"`` or ``"dali"`` for ``config`` (``"auto"``: device where the
    dataset supports it, `make_train_input` then also checking that it fits in device memory;
    for ImageNet DALI on NVIDIA GPUs where installed, else Grain)."""
    from revjax import data

    choice = config.input_pipeline  # one of config.INPUT_PIPELINES (checked by TrainConfig)
    if is_text(config):
        if choice not in ("auto", "device"):
            raise ValueError(f"Text datasets ({config.dataset!r}) live on the devices; use "
                             "input_pipeline='auto' or 'device'.")
        return "device"
    if config.dataset == "imagenet2012":
        return _resolve_imagenet_pipeline(choice)
    if choice == "dali":
        raise ValueError(f"input_pipeline='dali' reads imagenet2012 only, not {config.dataset!r}; "
                         "use 'auto', 'device' or 'grain'.")
    supported = config.dataset in data.DEVICE_DATASETS
    if choice == "device" and not supported:
        raise ValueError(
            f"input_pipeline='device' supports {', '.join(data.DEVICE_DATASETS)}, not "
            f"{config.dataset!r} (it does not fit in device memory); use input_pipeline='grain'."
        )
    if choice == "auto":
        return "device" if supported else "grain"
    return choice


def _resolve_imagenet_pipeline(choice: str) -> str:
    """`"grain"` or `"dali"` for ImageNet: `"auto"` is DALI on NVIDIA GPUs where it is
    installed, else the Grain host path; `"dali"` without DALI raises, saying how to install it.
    """
    from revjax.data import dali_pipeline

    if choice == "dali":
        dali_pipeline.require_dali()
        return "dali"
    if choice == "auto":
        return "dali" if dali_pipeline.dali_available() else "grain"
    if choice == "grain":
        return "grain"
    raise ValueError(
        f"input_pipeline={choice!r} cannot read imagenet2012 (it does not fit in device "
        "memory); use input_pipeline='grain' (every platform), 'dali' (NVIDIA GPUs) or 'auto'."
    )


# --------------------------------------------------------------------------------------------
# Language models: token windows of the model's context
# --------------------------------------------------------------------------------------------

#: Validation windows of a text dataset (nanoGPT evaluates 200 batches of 12).
TEXT_EVAL_WINDOWS = 2400


def is_text(config: TrainConfig) -> bool:
    """Whether ``config`` trains a language model on a text dataset."""
    from revjax.data.text import TEXT_DATASETS

    return config.dataset in TEXT_DATASETS


def lm_context(config: TrainConfig) -> int:
    """The context length of ``config``'s language model (its windows' length)."""
    from revjax import presets

    preset = presets.get(config.model)
    return int(config.model_overrides.get("context_length",
                                          preset.architecture["context_length"]))


def dataset_info(config: TrainConfig):
    """The `revjax.data.DatasetInfo` of ``config``'s dataset (a text dataset's: vocabulary size
    as ``num_classes``, ``(context, 1, 1)`` as ``image_shape``)."""
    from revjax import data

    if is_text(config):
        from revjax.data import text

        return text.text_dataset_info(config.dataset, config.data_dir, lm_context(config))
    return data.get_dataset_info(config.dataset, config.image_size)


def make_train_input(config: TrainConfig, mesh: Mesh, image_size: int):
    """The training input of ``config``: a `revjax.data.DeviceTrainInput`,
    `revjax.data.GrainTrainInput`, `revjax.data.ImageNetTrainInput` or
    `revjax.data.dali_pipeline.DaliTrainInput` (same interface: ``wrap_step``, ``step_args``,
    ``arg_shardings``, ``batch_at``, ``get_state`` / ``set_state``, ``close``)."""
    from revjax import data

    batch = batch_sharding(mesh)
    kind = resolve_input_pipeline(config)
    if is_text(config):  # token windows drawn in the step from the tokens on the devices
        from revjax.data import text

        tokens = text.load_text_dataset(config.dataset, config.data_dir).train
        return text.TextTrainInput(tokens, batch_size=config.batch_size,
                                   context=lm_context(config), seed=config.seed,
                                   batch_sharding=batch)
    if config.dataset == "imagenet2012":  # uint8 crops; flip, jitter, scaling in the step
        if kind == "dali":
            from revjax.data.dali_pipeline import DaliTrainInput

            return DaliTrainInput(
                batch_size=config.batch_size, seed=config.seed, batch_sharding=batch,
                data_dir=config.data_dir, image_size=image_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                prefetch=config.prefetch,
            )
        it = data.imagenet.train_iterator(
            batch_size=config.batch_size, seed=config.seed, data_dir=config.data_dir,
            image_size=image_size, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=config.num_workers,
        )
        return data.ImageNetTrainInput(it, batch, config.seed, prefetch=config.prefetch)
    if kind == "device":
        info = data.get_dataset_info(config.dataset)
        arrays = data.load_split(config.dataset, info.train_split, config.data_dir, image_size)
        nbytes = arrays[0].nbytes + arrays[1].nbytes
        if config.input_pipeline == "device" or data.fits_on_devices(nbytes):
            return data.DeviceTrainInput(
                config.dataset, batch_size=config.batch_size, seed=config.seed,
                batch_sharding=batch, data_dir=config.data_dir, arrays=arrays,
            )
        _log.warning("The %s training split (%d bytes) does not fit beside the model on every "
                     "device: using the Grain pipeline", config.dataset, nbytes)
    it = data.train_iterator(
        config.dataset, batch_size=config.batch_size, seed=config.seed,
        data_dir=config.data_dir, image_size=image_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.num_workers,
    )
    return data.GrainTrainInput(it, batch, config.prefetch)


def make_eval_input(config: TrainConfig, mesh: Mesh, image_size: int, kind: str,
                    batch_size: int) -> Callable[[], Iterator]:
    """A function returning one pass over the evaluation split as global masked batches:
    resident on the devices when ``kind == "device"``, else through Grain (ImageNet: uint8
    central crops, scaled on the devices)."""
    from revjax import data

    if is_text(config):
        from revjax.data import text

        tokens = text.load_text_dataset(config.dataset, config.data_dir).val
        windows = text.TextEvalInput(
            tokens, batch_size=batch_size, context=lm_context(config),
            num_windows=TEXT_EVAL_WINDOWS, batch_sharding=batch_sharding(mesh))
        return lambda: iter(windows)
    if config.dataset == "imagenet2012":
        return data.imagenet.make_eval_input(
            batch_size=batch_size, batch_sharding=batch_sharding(mesh),
            data_dir=config.data_dir, image_size=image_size, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=config.num_workers,
        )
    if kind == "device":
        resident = data.DeviceEvalInput(
            config.dataset, batch_size=batch_size, batch_sharding=batch_sharding(mesh),
            data_dir=config.data_dir, image_size=image_size,
        )
        return lambda: iter(resident)
    return lambda: data.eval_iterator(
        config.dataset, batch_size=batch_size, data_dir=config.data_dir, image_size=image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.num_workers,
    )
