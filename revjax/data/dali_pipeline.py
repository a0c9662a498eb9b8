"""ImageNet on NVIDIA GPUs through DALI: the JPEGs decoded on the GPU (nvJPEG / the hardware
JPEG decoder of A100 and H100, DALI's "mixed" decoder), the rest as on the host path.

What each side does per training step k:

- host (this process, any number of Grain reader threads): the order and the crop boxes, from
  the same Grain stream as `revjax.data.imagenet` (same seed, same shuffle, same per-record
  generator, the box sampled from the JPEG header): the crops are geometrically the ones the
  host path takes. The JPEG bytes and boxes go to DALI as they are; nothing is decoded here.
- DALI, one pipeline per local device: decodes only the box's region
  (`fn.decoders.image_slice`) and resizes it bilinearly (antialiased) to `image_size` squared,
  uint8, on that device: each device gets its own rows of the global batch, no copy between
  devices.
- the train step: flip, colour jitter and scaling to [-1, 1], keyed by `(seed, k)`, as the host
  path (`ImageNetTrainInput.augment`).

The position is the Grain stream's state (the examples consumed), so a checkpoint resumes
exactly; the pixels of a crop differ slightly from the host path's (another JPEG decoder and
resize kernel), so a checkpoint resumes only with the pipeline that wrote it. One process per
host drives all of the host's GPUs. Evaluation uses the host path (a central crop per image,
once per evaluation).

Without a GPU (tests) the same pipelines run in DALI's CPU-only mode (`device_id=None`, the
"cpu" decoder), one per local CPU device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from revjax.data import imagenet, transforms
from revjax.data.grain_pipeline import iterate, stream_from_source

__all__ = ["DaliTrainInput", "dali_available", "dali_install_hint", "require_dali"]

def dali_install_hint() -> str:
    return (
        "input_pipeline='dali' needs NVIDIA DALI (Linux, NVIDIA GPU): pip install "
        "'revjax[dali]' (the CUDA 12 wheel, nvidia-dali-cuda120; for CUDA 13: pip install "
        "nvidia-dali-cuda130), or use input_pipeline='grain' (the host path, every platform)."
    )


def _import_dali():
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    return dali


def require_dali():
    """The `nvidia.dali` module, or an ImportError saying how to install it."""
    dali = _import_dali()
    if dali is None:
        raise ImportError(dali_install_hint())
    return dali


def dali_available() -> bool:
    """DALI is installed and JAX runs on NVIDIA GPUs (what `input_pipeline="auto"` checks)."""
    return jax.default_backend() in ("gpu", "cuda") and _import_dali() is not None


@dataclasses.dataclass(frozen=True)
class ImageNetCropBox:
    """Grain `random_map` step: `{"image": JPEG bytes, "label"}` -> the bytes as uint8, the
    Inception crop box `int32[4]` (top, left, h, w) from the header, and the label.

    Draws from the generator exactly as `imagenet.ImageNetTrainCrop`: the same boxes."""

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
        jpeg = example["image"]
        if not isinstance(jpeg, bytes | bytearray | memoryview):
            raise TypeError(
                "The DALI pipeline decodes JPEGs itself: the source must give encoded images "
                "(revjax.data.make_source(..., encoded=True))."
            )
        height, width = imagenet.jpeg_size(bytes(jpeg))
        box = transforms.random_crop_box(height, width, rng)
        return {
            "jpeg": np.frombuffer(bytes(jpeg), np.uint8),
            "box": np.asarray(box, np.int32),
            "label": np.int32(example["label"]),
        }


def _keep_ragged(records):
    """Grain `batch_fn`: JPEGs of different lengths stay a list; boxes and labels stack."""
    return {
        "jpeg": [r["jpeg"] for r in records],
        "box": np.stack([r["box"] for r in records]),
        "label": np.stack([r["label"] for r in records]),
    }


def _pipeline(batch_size: int, image_size: int, device_id: int | None, num_threads: int):
    dali = require_dali()
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                       exec_dynamic=True, prefetch_queue_depth=1)
    def crops():
        jpeg = fn.external_source(name="jpeg", dtype=types.UINT8, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
        image = fn.decoders.image_slice(
            jpeg, anchor, shape, device="cpu" if device_id is None else "mixed",
            output_type=types.RGB, axis_names="HW", normalized_anchor=False,
            normalized_shape=False,
        )
        return fn.resize(image, size=[image_size, image_size], interp_type=types.INTERP_LINEAR,
                         antialias=True, dtype=types.UINT8)

    pipe = crops()
    pipe.build()
    return pipe


class _DaliBatches:
    """Iterator of global uint8 batches on the devices: records from Grain, crops from DALI.

    `get_state` / `set_state` are the Grain record stream's (the position)."""

    def __init__(self, records, batch_sharding, image_size: int, num_threads: int):
        self._records = records
        self._sharding = batch_sharding
        self._image_size = image_size
        self._local_batch = None
        self._devices = None  # [(device, local row offset, rows)]
        self._pipes = None
        self._num_threads = num_threads

    def _setup(self, local_batch: int) -> None:
        global_batch = local_batch * jax.process_count()
        index = self._sharding.addressable_devices_indices_map((global_batch,))
        placed = sorted(index.items(), key=lambda kv: kv[1][0].start or 0)
        first = placed[0][1][0].start or 0
        self._devices = [
            (device, (sl[0].start or 0) - first, (sl[0].stop or global_batch) - (sl[0].start or 0))
            for device, sl in placed
        ]
        on_gpu = self._devices[0][0].platform in ("gpu", "cuda")
        self._pipes = [
            _pipeline(rows, self._image_size, device.local_hardware_id if on_gpu else None,
                      self._num_threads)
            for device, _, rows in self._devices
        ]
        self._local_batch = local_batch
        self._global_batch = global_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        records = next(self._records)
        local_batch = len(records["jpeg"])
        if self._pipes is None:
            self._setup(local_batch)
        shards = []
        for pipe, (device, start, rows) in zip(self._pipes, self._devices):
            boxes = records["box"][start : start + rows]
            pipe.feed_input("jpeg", records["jpeg"][start : start + rows])
            pipe.feed_input("anchor", [b[:2].astype(np.float32) for b in boxes])
            pipe.feed_input("shape", [b[2:].astype(np.float32) for b in boxes])
            (out,) = pipe.run()
            tensor = out.as_tensor()
            if device.platform in ("gpu", "cuda"):
                # DALI reuses its output buffers on the next run: copy on the device.
                shards.append(jax.dlpack.from_dlpack(tensor).copy())
            else:
                shards.append(jax.device_put(np.array(tensor), device))
        shape = (self._global_batch, self._image_size, self._image_size, 3)
        image = jax.make_array_from_single_device_arrays(shape, self._sharding, shards)
        label = jax.make_array_from_process_local_data(self._sharding, records["label"])
        return {"image": image, "label": label}

    def get_state(self):
        return self._records.get_state()

    def set_state(self, state) -> None:
        self._records.set_state(state)

    def close(self) -> None:
        close = getattr(self._records, "close", None)
        if close is not None:
            close()
        self._pipes = None


class DaliTrainInput(imagenet.ImageNetTrainInput):
    """ImageNet training input decoded by DALI (see the module docstring); the interface and
    the in-step augmentation of `revjax.data.ImageNetTrainInput`.

    Args:
      batch_size: global batch size.
      seed: the run's seed (order, crop boxes, augmentation).
      batch_sharding: the global batch `NamedSharding`.
      data_dir, split: where the ImageNet ArrayRecords are (`source` overrides).
      image_size: output side.
      process_index, process_count: this process among all (one per host).
      num_threads: Grain reader threads and DALI CPU threads per pipeline.
      prefetch: batches prepared ahead of the step.
      color_jitter: apply the colour jitter in the step.
      source: random-access `{"image": JPEG bytes, "label"}` (tests, benchmarks).
    """

    kind = "dali"

    def __init__(
        self,
        *,
        batch_size: int,
        seed: int,
        batch_sharding,
        data_dir: str | os.PathLike | None = None,
        split: str = "train",
        image_size: int = 224,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int | None = None,
        prefetch: int = 2,
        color_jitter: bool = True,
        source=None,
    ):
        require_dali()
        if source is None:
            source = imagenet.encoded_source(split, data_dir)
        threads = num_threads if num_threads is not None else min(4, os.cpu_count() or 1)
        ds = stream_from_source(
            source, ImageNetCropBox(), batch_size=batch_size, seed=seed,
            process_index=process_index, process_count=process_count, batch_fn=_keep_ragged,
        )
        batches = _DaliBatches(iterate(ds, threads, 0), batch_sharding, image_size, threads)
        super().__init__(batches, batch_sharding, seed, color_jitter, prefetch)
