"""ImageNet input that keeps an accelerator busy: reduced-scale JPEG decoding on the host, uint8
batches, and the float augmentation inside the compiled train step.

The host (Grain workers, every platform) does only what needs the JPEG:

1. read the image size from the JPEG header and sample the Inception crop box from it (area
   5-100 %, aspect ratio 3/4-4/3, `revjax.data.transforms`' sampler, 100 attempts, else the
   whole image);
2. decode at the smallest libjpeg DCT scale, 1/d with d in (1, 2, 4, 8), at which the crop still
   has at least `image_size` pixels on each side (`reduction_for`): a 500x375 photo cropped
   to 40 % of its area decodes at 1/1, a 10 % crop at 1/2... at 224 the saving comes from the
   many crops near full size at 128 or lower resolutions, at 224 mostly from decoding the
   rest of the pipeline in uint8;
3. resize the crop's region of the decoded image bilinearly to `image_size` squared (PIL, with
   the crop box mapped to the decoded image's coordinates, `box / d`, so the region is the
   same one a full-size decode would crop) and ship uint8: 1 byte per pixel, not 4.

The device, inside the jitted train step and keyed by `(seed, step)` as the CIFAR device
pipeline: a left-right flip with probability 1/2, the authors' colour jitter (brightness
+-32/255, saturation x0.5..1.5, hue +-0.2 of a turn, contrast x0.5..1.5, one of two orders per
image, clipped to [0, 1]) and the scaling to [-1, 1] (`augment_batch`). On CPU it equals the
numpy reference (`revjax.data.transforms.imagenet_augment_reference`) bit for bit for the same
draws; on GPUs XLA may fuse multiply-adds, so the last bit can differ there.

Evaluation decodes the central 87.5 % crop the same way (reduced when it is large enough) and
scales to [-1, 1] on the device (`to_unit_range`).

The random draws: the crop box of an example depends on the seed and the example's position in
the stream (Grain's per-record generator); the flip and jitter of row i of step k on
`fold_in(augment_key(seed), k)` only. Both are independent of the number of devices, processes
and workers, so a run resumes bit-identically from a checkpoint that stores the Grain position.

Modules: `revjax.data.imagenet_decode` (the host: header, crop box, reduced decode),
`revjax.data.imagenet_augment` (the device: flip, jitter, scaling) and this one (the Grain
streams and the trainer's input; `revjax.train.inputs` chooses the pipeline); this module's
names include both others' public names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from revjax.data import grain_pipeline
from revjax.data.grain_pipeline import GrainTrainInput, global_batch
from revjax.data.imagenet_augment import JitterDraws as JitterDraws
from revjax.data.imagenet_augment import augment_batch as augment_batch
from revjax.data.imagenet_augment import augment_key as augment_key
from revjax.data.imagenet_augment import draw_jitter as draw_jitter
from revjax.data.imagenet_augment import to_unit_range as to_unit_range
from revjax.data.imagenet_decode import DECODERS as DECODERS
from revjax.data.imagenet_decode import JPEG_REDUCTIONS as JPEG_REDUCTIONS
from revjax.data.imagenet_decode import ImageNetEvalCrop as ImageNetEvalCrop
from revjax.data.imagenet_decode import ImageNetTrainCrop as ImageNetTrainCrop
from revjax.data.imagenet_decode import decode_crop as decode_crop
from revjax.data.imagenet_decode import jpeg_size as jpeg_size
from revjax.data.imagenet_decode import reduction_for as reduction_for

__all__ = [
    "DECODERS",
    "JPEG_REDUCTIONS",
    "ImageNetEvalCrop",
    "ImageNetTrainCrop",
    "ImageNetTrainInput",
    "JitterDraws",
    "augment_batch",
    "augment_key",
    "decode_crop",
    "draw_jitter",
    "jpeg_size",
    "reduction_for",
    "to_unit_range",
]


# --------------------------------------------------------------------------------------------
# Grain streams and the trainer's input
# --------------------------------------------------------------------------------------------


def encoded_source(split: str, data_dir: str | os.PathLike | None = None):
    """The ImageNet split with the images left encoded: `{"image": JPEG bytes, "label"}`."""
    from revjax.data.sources import make_source

    return make_source("imagenet2012", split, data_dir, encoded=True)


def train_dataset(
    *,
    batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    image_size: int = 224,
    process_index: int = 0,
    process_count: int = 1,
    source=None,
    max_reduction: int = 8,
):
    """The infinite stream of per-process uint8 crop batches (see `train_iterator`)."""
    if source is None:
        source = encoded_source(split, data_dir)
    return grain_pipeline.stream_from_source(
        source, ImageNetTrainCrop(image_size, max_reduction), batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count,
    )


def train_iterator(*, num_threads: int | None = None, num_workers: int = 0, **kwargs):
    """A checkpointable Grain iterator of `{"image": uint8[B, S, S, 3], "label": int32[B]}`
    batches of reduced-scale-decoded Inception crops (arguments: `train_dataset`'s, and
    `revjax.data.train_iterator`'s reader threads and worker processes)."""
    return grain_pipeline.iterate(train_dataset(**kwargs), num_threads, num_workers)


def eval_dataset(
    *,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    split: str = "validation",
    image_size: int = 224,
    process_index: int = 0,
    process_count: int = 1,
    source=None,
):
    """Evaluation batches `{"image": uint8, "label", "mask"}`: every example once, in split
    order, padded with zero images (mask 0) to a multiple of the global batch size."""
    if source is None:
        source = encoded_source(split, data_dir)
    return grain_pipeline.eval_stream_from_source(
        source, ImageNetEvalCrop(image_size), batch_size=batch_size,
        pad=grain_pipeline.PadExample((image_size, image_size, 3), "uint8"),
        process_index=process_index, process_count=process_count,
    )


def eval_batches(iterator, sharding):
    """Global evaluation batches on the devices, images scaled to [-1, 1] there."""
    scale = jax.jit(to_unit_range, out_shardings=sharding)
    for local in iterator:
        batch = global_batch(local, sharding)
        batch["image"] = scale(batch["image"])
        yield batch


class ImageNetTrainInput(GrainTrainInput):
    """ImageNet training input through Grain: uint8 crops from the host, augmented in the step.

    Same interface as `revjax.data.GrainTrainInput` (``wrap_step``, ``step_args``,
    ``arg_shardings``, ``batch_at``, ``get_state`` / ``set_state``, ``close``); `wrap_step`
    turns a train step on float batches into one on uint8 batches whose flip and jitter come
    from `fold_in(augment_key(seed), state.step)`.

    Args:
      iterator: `train_iterator(...)` (per-process uint8 batches).
      batch_sharding: the global batch `NamedSharding`.
      seed: the run's seed.
      color_jitter: apply the colour jitter (flip and scaling always).
      prefetch: batches copied to the devices ahead of the step.
    """

    kind = "grain"

    def __init__(self, iterator, batch_sharding, seed: int, color_jitter: bool = True,
                 prefetch: int = 2):
        super().__init__(iterator, batch_sharding, prefetch)
        self.seed = int(seed)
        self.color_jitter = color_jitter
        self._augment_fn = jax.jit(self.augment, out_shardings=batch_sharding)

    def augment(self, batch: Mapping[str, jax.Array], step) -> dict:
        """Batch of step `step` (traceable): the uint8 images flipped, jittered and scaled."""
        key = jax.random.fold_in(augment_key(self.seed), jnp.asarray(step, jnp.int32))
        draws = draw_jitter(key, batch["image"].shape[0])
        image = augment_batch(batch["image"], draws, self.color_jitter)
        image = jax.lax.with_sharding_constraint(image, self.batch_sharding)
        return {**batch, "image": image}

    def wrap_step(self, train_step):
        def fused(state, batch):
            return train_step(state, self.augment(batch, state.step))

        return fused

    def batch_at(self, step: int) -> dict:
        """The augmented batch of the last step read (`step` is its index)."""
        return self._augment_fn(super().batch_at(step), step)


# --------------------------------------------------------------------------------------------
# What the trainer builds (the training input: `revjax.train.inputs.make_train_input`)
# --------------------------------------------------------------------------------------------


def make_eval_input(
    *,
    batch_size: int,
    batch_sharding,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
):
    """A function returning one pass over the validation split as global masked batches on
    the devices (uint8 central crops from the host, scaled to [-1, 1] on the devices)."""
    ds = eval_dataset(batch_size=batch_size, data_dir=data_dir, image_size=image_size,
                      process_index=process_index, process_count=process_count)

    def one_pass():
        return eval_batches(grain_pipeline.iterate(ds, None, num_workers), batch_sharding)

    return one_pass
