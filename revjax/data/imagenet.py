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
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from revjax.data import grain_pipeline, transforms
from revjax.data.grain_pipeline import GrainTrainInput, global_batch
from revjax.data.transforms import (
    IMAGENET_BRIGHTNESS_DELTA,
    IMAGENET_CONTRAST_RANGE,
    IMAGENET_HUE_DELTA,
    IMAGENET_SATURATION_RANGE,
    PIXEL_SCALE,
)

__all__ = [
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

# libjpeg's DCT scaling: a baseline JPEG decodes at 1/1, 1/2, 1/4 or 1/8 of its size for a
# fraction of the full decode's work (fewer DCT coefficients, smaller colour conversion).
JPEG_REDUCTIONS: tuple[int, ...] = (1, 2, 4, 8)

# uint8 value -> float32 in [0, 1], as numpy's `u.astype(float32) * PIXEL_SCALE`.
_UNIT_TABLE = np.arange(256, dtype=np.float32) * PIXEL_SCALE

# Salt of the augmentation key, so the device draws do not reuse the model's init key.
_AUGMENT_SALT = 0x1A6E


# --------------------------------------------------------------------------------------------
# Host: header, crop box, reduced decode
# --------------------------------------------------------------------------------------------


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """`(height, width)` of a JPEG (or any image PIL reads) from its header, without decoding."""
    from PIL import Image

    sj = _simplejpeg()
    if sj is not None and sj.is_jpeg(jpeg):
        height, width, _, _ = sj.decode_jpeg_header(jpeg)
        return height, width
    with Image.open(io.BytesIO(jpeg)) as im:
        return im.size[1], im.size[0]


def reduction_for(crop_height: int, crop_width: int, image_size: int, max_reduction: int = 8):
    """The largest d in `JPEG_REDUCTIONS` (<= `max_reduction`) with both crop sides / d >=
    `image_size`: decoding at 1/d then still shrinks (or keeps) the crop, never enlarges it."""
    side = min(crop_height, crop_width)
    for d in reversed(JPEG_REDUCTIONS):
        if d <= max_reduction and side >= d * image_size:
            return d
    return 1


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


DECODERS: tuple[str, ...] = ("auto", "simplejpeg", "pil")


def _reduction_of(height: int, width: int, decoded_hw, requested: int) -> int:
    """The d of a libjpeg output of size `decoded_hw`: libjpeg's 1/d image is
    `(ceil(height / d), ceil(width / d))`; the requested d first (tiny images fit several)."""
    for d in (requested, *JPEG_REDUCTIONS):
        if tuple(decoded_hw) == (-(-height // d), -(-width // d)):
            return d
    raise ValueError(
        f"The JPEG decoder returned {tuple(decoded_hw)} for a {height}x{width} image at 1/"
        f"{requested}: not a 1/1, 1/2, 1/4 or 1/8 scale."
    )


def _decode_reduced(jpeg: bytes, reduction: int, decoder: str = "auto"):
    """The JPEG decoded at 1/`reduction` (libjpeg DCT scaling) as an RGB PIL image, and the
    reduction actually used (1 for non-JPEG data).

    `decoder`: "simplejpeg" (libjpeg-turbo's TurboJPEG API through the `simplejpeg` package,
    ~1.5x PIL's rate here), "pil" (PIL's bundled libjpeg-turbo through `Image.draft`), "auto"
    (simplejpeg when installed). Both run libjpeg-turbo's accurate integer DCT with fancy
    upsampling.
    """
    from PIL import Image

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
    sj = _simplejpeg() if decoder in ("auto", "simplejpeg") else None
    if decoder == "simplejpeg" and sj is None:
        raise ImportError("decoder='simplejpeg' needs the simplejpeg package: "
                          "pip install simplejpeg")
    if sj is not None and sj.is_jpeg(jpeg):
        height, width, _, _ = sj.decode_jpeg_header(jpeg)
        # The smallest TurboJPEG scale whose output is at least these sizes is exactly 1/d.
        array = sj.decode_jpeg(jpeg, "RGB", min_height=height // reduction,
                               min_width=width // reduction)
        return Image.fromarray(array), _reduction_of(height, width, array.shape[:2], reduction)
    im = Image.open(io.BytesIO(jpeg))
    used = 1
    if reduction > 1 and im.format == "JPEG":
        # draft picks the largest 1/d with both sides >= the request; floor(size / d) asks for 1/d.
        full_width = im.size[0]
        result = im.draft("RGB", (full_width // reduction, im.size[1] // reduction))
        if result is not None:  # (mode, (0, 0, width / d, height / d))
            used = int(round(full_width / result[1][2]))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im, used


def decode_crop(
    jpeg: bytes,
    box: tuple[int, int, int, int],
    image_size: int,
    reduction: int | None = None,
    decoder: str = "auto",
) -> np.ndarray:
    """Decodes the region `box = (top, left, h, w)` of a JPEG, resized to uint8 `image_size`^2.

    The JPEG is decoded at 1/d (`reduction`, default `reduction_for(h, w, image_size)`) and
    the box is mapped to that image as `box / d` (libjpeg's pixel i at 1/d covers full-size
    pixels `[i d, (i + 1) d)`), so the output shows the same region of the photo as a
    full-size decode, cropped and resized; it differs only by the decoder's downscaling.

    Args:
      jpeg: encoded bytes (any format PIL reads; non-JPEGs are decoded at full size).
      box: `(top, left, h, w)` in full-size pixels.
      image_size: output side.
      reduction: 1, 2, 4 or 8.
      decoder: see `DECODERS` ("auto": simplejpeg when installed, else PIL).

    Returns:
      uint8 `[image_size, image_size, 3]`.
    """
    from PIL import Image

    top, left, h, w = box
    d = reduction_for(h, w, image_size) if reduction is None else reduction
    if d not in JPEG_REDUCTIONS:
        raise ValueError(f"reduction must be one of {JPEG_REDUCTIONS}, got {d!r}.")
    im, d = _decode_reduced(jpeg, d, decoder)
    region = (left / d, top / d, (left + w) / d, (top + h) / d)
    out = im.resize((image_size, image_size), Image.Resampling.BILINEAR, box=region)
    return np.asarray(out)


def _crop_from_array(image: np.ndarray, box, image_size: int) -> np.ndarray:
    """The same crop and resize from an already decoded uint8 image (sources that decode)."""
    from PIL import Image

    top, left, h, w = box
    image = np.asarray(image)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    pil = Image.fromarray(image)
    out = pil.resize((image_size, image_size), Image.Resampling.BILINEAR,
                     box=(left, top, left + w, top + h))
    return np.asarray(out)


def _encoded_size(image) -> tuple[int, int]:
    if isinstance(image, bytes | bytearray | memoryview):
        return jpeg_size(bytes(image))
    shape = np.shape(image)
    return shape[0], shape[1]


def _crop(image, box, setting) -> np.ndarray:
    """The crop of `box` by the setting's (`image_size`, `max_reduction`, `decoder`)."""
    if isinstance(image, bytes | bytearray | memoryview):
        d = reduction_for(box[2], box[3], setting.image_size, setting.max_reduction)
        return decode_crop(bytes(image), box, setting.image_size, d, setting.decoder)
    return _crop_from_array(image, box, setting.image_size)


@dataclasses.dataclass(frozen=True)
class ImageNetTrainCrop:
    """Grain `random_map` step: `{"image": JPEG bytes | uint8[H, W, 3], "label"}` ->
    `{"image": uint8[image_size, image_size, 3], "label": int32}`, an Inception crop decoded
    at reduced scale. `max_reduction=1` decodes at full size (the reference); `decoder`: see
    `decode_crop`."""

    image_size: int
    max_reduction: int = 8
    decoder: str = "auto"

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
        height, width = _encoded_size(example["image"])
        box = transforms.random_crop_box(height, width, rng)
        return {
            "image": _crop(example["image"], box, self),
            "label": np.int32(example["label"]),
        }


@dataclasses.dataclass(frozen=True)
class ImageNetEvalCrop:
    """Grain `map` step: the central 87.5 % crop, decoded at reduced scale, uint8, with
    `mask` 1.0 (evaluation batches are padded)."""

    image_size: int
    max_reduction: int = 8
    decoder: str = "auto"

    def __call__(self, example: Mapping[str, Any]) -> dict:
        height, width = _encoded_size(example["image"])
        box = transforms.central_crop_box(height, width)
        return {
            "image": _crop(example["image"], box, self),
            "label": np.int32(example["label"]),
            "mask": np.float32(1.0),
        }


# --------------------------------------------------------------------------------------------
# Device: flip, colour jitter, scaling (jit-compatible, bit-equal to the numpy reference)
# --------------------------------------------------------------------------------------------


class JitterDraws(NamedTuple):
    """Per-image random values of the device augmentation, each `[B]`.

    flip: bool, mirror left-right. brightness: float32 delta on [0, 1] pixels. saturation,
    contrast: float32 factors. hue: float32 rotation (fraction of a turn). saturation_first:
    bool, the order (saturation + hue, then contrast; or contrast first).
    """

    flip: jax.Array
    brightness: jax.Array
    saturation: jax.Array
    hue: jax.Array
    contrast: jax.Array
    saturation_first: jax.Array


def augment_key(seed: int) -> jax.Array:
    """The key of the device augmentation of run `seed`; step k draws from `fold_in(., k)`."""
    return jax.random.fold_in(jax.random.key(seed), _AUGMENT_SALT)


def draw_jitter(key: jax.Array, batch_size: int) -> JitterDraws:
    """Draws the flips and the jitter of a batch: uniform on the authors' ranges, p = 1/2."""
    keys = jax.random.split(key, 6)

    def uniform(k, low, high):
        return jax.random.uniform(k, (batch_size,), jnp.float32, low, high)

    return JitterDraws(
        flip=jax.random.bernoulli(keys[0], 0.5, (batch_size,)),
        brightness=uniform(keys[1], -IMAGENET_BRIGHTNESS_DELTA, IMAGENET_BRIGHTNESS_DELTA),
        saturation=uniform(keys[2], *IMAGENET_SATURATION_RANGE),
        hue=uniform(keys[3], -IMAGENET_HUE_DELTA, IMAGENET_HUE_DELTA),
        contrast=uniform(keys[4], *IMAGENET_CONTRAST_RANGE),
        saturation_first=jax.random.bernoulli(keys[5], 0.5, (batch_size,)),
    )


def _tree_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis by halving (zero-padded to a power of two): the association
    `transforms.tree_sum` uses, so both give the same float32 bits."""
    n = x.shape[-1]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], size - n), x.dtype)], axis=-1)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def _product(a, b):
    """`a * b` rounded to float32 on its own before any addition.

    XLA fuses a multiply feeding an add into one fused multiply-add (a single rounding), where
    numpy rounds twice; the select (a no-op on finite values) keeps the product separate, so
    the jitter matches its numpy reference bit for bit.
    """
    p = a * b
    return jnp.where(p == p, p, jnp.float32(0))


def _rgb_to_hsv(r, g, b):
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    delta = maxc - jnp.minimum(jnp.minimum(r, g), b)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    s = delta / jnp.maximum(maxc, tiny)
    inv = 1 / jnp.maximum(delta, tiny)
    h = 4 + _product(r - g, inv)
    h = jnp.where(g == maxc, 2 + _product(b - r, inv), h)
    h = jnp.where(r == maxc, (g - b) * inv, h)
    h = jnp.where(delta > 0, jnp.remainder(h * jnp.float32(1 / 6), 1), 0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    h6 = _product(h, jnp.float32(6))
    i = jnp.floor(h6)
    f = h6 - i
    p = v * (1 - s)
    q = v * (1 - _product(s, f))
    t = v * (1 - _product(s, 1 - f))
    i = jnp.remainder(i.astype(jnp.int32), 6)

    def choose(*options):
        out = options[5]
        for k in range(4, -1, -1):
            out = jnp.where(i == k, options[k], out)
        return out

    return choose(v, q, p, p, t, v), choose(t, v, v, q, p, p), choose(p, p, t, v, v, q)


def _saturation_and_hue(planes, saturation, hue):
    h, s, v = _rgb_to_hsv(*planes)
    s = jnp.clip(s * saturation, 0, 1)
    h = jnp.remainder(h + hue, 1)
    return _hsv_to_rgb(h, s, v)


def _contrast(planes, contrast):
    out = []
    for c in planes:  # [B, H, W]
        flat = c.reshape(c.shape[0], -1)
        mean = _product(_tree_sum(flat), jnp.float32(1 / flat.shape[1]))[:, None, None]
        out.append(_product(c - mean, contrast) + mean)
    return tuple(out)


def augment_batch(
    images: jax.Array, draws: JitterDraws, color_jitter: bool = True
) -> jax.Array:
    """Flip, colour jitter and scaling to [-1, 1] of uint8 crops, in JAX (jit it).

    Args:
      images: uint8 `[B, H, W, 3]`, the host's crops.
      draws: `draw_jitter(key, B)`.
      color_jitter: False: flip and scaling only.

    Returns:
      float32 `[B, H, W, 3]` in [-1, 1].
    """
    x = jnp.where(draws.flip[:, None, None, None], images[:, :, ::-1], images)
    # A table lookup, not a multiply: XLA would fuse `u * scale + brightness` into one FMA.
    x = jnp.take(jnp.asarray(_UNIT_TABLE), x.astype(jnp.int32), mode="clip")
    if color_jitter:
        col = lambda a: a[:, None, None]  # noqa: E731  [B] -> [B, 1, 1]
        planes = tuple(x[..., c] + col(draws.brightness) for c in range(3))  # [B, H, W] each
        sat, hue, con = col(draws.saturation), col(draws.hue), col(draws.contrast)
        pick = col(draws.saturation_first)
        # Each image takes one order; the HSV round trip (the costly part) runs once for all:
        # contrast before it where contrast comes first, after it where it comes second.
        planes = tuple(jnp.where(pick, a, b) for a, b in zip(planes, _contrast(planes, con)))
        planes = _saturation_and_hue(planes, sat, hue)
        planes = tuple(jnp.where(pick, a, b) for a, b in zip(_contrast(planes, con), planes))
        x = jnp.clip(jnp.stack(planes, axis=-1), 0, 1)
    return x * 2 - 1


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 -> float32 in [-1, 1] (evaluation), as `augment_batch` without augmentation."""
    return images.astype(jnp.float32) * jnp.float32(PIXEL_SCALE) * 2 - 1


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
    import grain

    if batch_size % process_count:
        raise ValueError(
            f"The global batch size {batch_size} is not divisible by the number of processes "
            f"{process_count}."
        )
    local = batch_size // process_count
    if source is None:
        source = encoded_source(split, data_dir)
    n = len(source)
    ds = grain.MapDataset.source(source).map(ImageNetEvalCrop(image_size))
    padded = math.ceil(n / batch_size) * batch_size
    if padded > n:
        pad = grain.MapDataset.range(padded - n).map(_PadUint8((image_size, image_size, 3)))
        ds = grain.MapDataset.concatenate([ds, pad])
    return ds[process_index::process_count].batch(local, drop_remainder=True)


@dataclasses.dataclass(frozen=True)
class _PadUint8:
    shape: tuple[int, int, int]

    def __call__(self, _: int) -> dict:
        return {"image": np.zeros(self.shape, np.uint8), "label": np.int32(0),
                "mask": np.float32(0.0)}


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
# What the trainer builds
# --------------------------------------------------------------------------------------------

# The trainer's `TrainConfig.input_pipeline` names: "auto" resolves per dataset and platform.
INPUT_PIPELINES: tuple[str, ...] = ("auto", "device", "grain", "dali")


def resolve_imagenet_pipeline(choice: str) -> str:
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


def make_train_input(
    kind: str,
    *,
    batch_size: int,
    seed: int,
    batch_sharding,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    prefetch: int = 2,
):
    """The trainer's ImageNet training input: `ImageNetTrainInput` (kind "grain") or
    `revjax.data.dali_pipeline.DaliTrainInput` (kind "dali")."""
    if kind == "dali":
        from revjax.data.dali_pipeline import DaliTrainInput

        return DaliTrainInput(
            batch_size=batch_size, seed=seed, batch_sharding=batch_sharding, data_dir=data_dir,
            image_size=image_size, process_index=process_index, process_count=process_count,
            prefetch=prefetch,
        )
    it = train_iterator(
        batch_size=batch_size, seed=seed, data_dir=data_dir, image_size=image_size,
        process_index=process_index, process_count=process_count, num_workers=num_workers,
    )
    return ImageNetTrainInput(it, batch_sharding, seed, prefetch=prefetch)


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
