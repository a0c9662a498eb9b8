"""Per-example transforms (numpy + PIL), the reference definition of every augmentation.

Each returns `{"image": float32[H, W, C], "label": int32}`. The Grain pipeline applies them per
example; the device pipeline (`revjax.data.device`) reimplements the CIFAR and digits ones in
JAX and is tested equal to these, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# ImageNet colour jitter, as in the RevNet authors' code (Inception preprocessing), on [0, 1]
# images: brightness delta, saturation and contrast factors, hue rotation (fraction of a turn).
IMAGENET_BRIGHTNESS_DELTA = 32.0 / 255.0
IMAGENET_SATURATION_RANGE = (0.5, 1.5)
IMAGENET_HUE_DELTA = 0.2
IMAGENET_CONTRAST_RANGE = (0.5, 1.5)
# Inception-style random resized crop.
IMAGENET_AREA_RANGE = (0.05, 1.0)
IMAGENET_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
IMAGENET_CROP_ATTEMPTS = 100
IMAGENET_EVAL_CENTRAL_FRACTION = 0.875

CIFAR_PAD = 2  # 32x32 -> 36x36, then a random 32x32 crop

# Digits are scaled to [0, 1] by this float32 factor (a multiplication, not a division by 255:
# XLA turns a division by a constant into this multiplication, so numpy does the same and the
# device pipeline matches it bit for bit).
PIXEL_SCALE = np.float32(1.0 / 255.0)

# --------------------------------------------------------------------------------------------
# Per-example transforms (numpy + PIL). Each returns {"image": float32[H, W, C], "label": int32}.
# --------------------------------------------------------------------------------------------


def example_label(example: Mapping[str, Any]) -> np.int32:
    """An example's class label as the pipelines' ``int32``."""
    return np.int32(example["label"])


def cifar_train_transform(
    example: Mapping[str, Any], rng: np.random.Generator, mean: np.ndarray
) -> dict[str, np.ndarray]:
    """CIFAR training augmentation of the RevNet authors' code.

    The mean image is subtracted first, then the image is zero-padded by 2 pixels on each side
    (so the padding is the mean colour in the original space) to 36x36, a random 32x32 window is
    cropped and flipped left-right with probability 1/2. Values stay in 0..255 units (no
    division by 255), as in that code.

    Args:
      example: `{"image": uint8[32, 32, 3], "label": int}`.
      rng: per-record generator.
      mean: per-pixel mean image, float32 [32, 32, 3].

    Returns:
      `{"image": float32[32, 32, 3], "label": int32}`.
    """
    image = np.asarray(example["image"], dtype=np.float32) - mean
    h, w = image.shape[:2]
    padded = np.pad(image, ((CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD), (0, 0)))
    top, left = rng.integers(0, 2 * CIFAR_PAD + 1, size=2)
    image = padded[top : top + h, left : left + w]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": example_label(example)}


def cifar_eval_transform(example: Mapping[str, Any], mean: np.ndarray) -> dict[str, np.ndarray]:
    """CIFAR evaluation preprocessing: mean subtraction only (0..255 units)."""
    image = np.asarray(example["image"], dtype=np.float32) - mean
    return {"image": image, "label": example_label(example)}


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 HWC image with PIL (antialiased when shrinking)."""
    from PIL import Image

    if image.shape[0] == height and image.shape[1] == width:
        return image
    if image.shape[2] == 1:
        pil = Image.fromarray(image[..., 0])
        return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))[..., None]
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))


def _random_crop_box(
    height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Samples an Inception-style crop `(top, left, h, w)`; the whole image if none fits."""
    area = height * width
    for _ in range(IMAGENET_CROP_ATTEMPTS):
        # Area and aspect ratio are sampled uniformly, like tf.image.sample_distorted_bounding_box.
        target_area = rng.uniform(*IMAGENET_AREA_RANGE) * area
        aspect = rng.uniform(*IMAGENET_ASPECT_RANGE)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < h <= height and 0 < w <= width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return 0, 0, height, width


# Colour ops work on planar [3, H, W] float32 arrays: contiguous channel planes are several times
# faster in numpy than strided [..., c] slices of an HWC image.


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Planar RGB -> HSV on [0, 1] floats, same convention as `colorsys` (hue in [0, 1))."""
    r, g, b = rgb
    maxc = np.maximum(np.maximum(r, g), b)
    delta = maxc - np.minimum(np.minimum(r, g), b)
    tiny = np.finfo(rgb.dtype).tiny
    s = delta / np.maximum(maxc, tiny)  # 0 where maxc == 0, since then delta == 0
    inv = 1 / np.maximum(delta, tiny)
    h = 4 + (r - g) * inv
    h = np.where(g == maxc, 2 + (b - r) * inv, h)
    h = np.where(r == maxc, (g - b) * inv, h)
    h = np.where(delta > 0, (h / 6) % 1, 0)  # grey pixels: hue 0
    return np.stack([h, s, maxc]).astype(rgb.dtype, copy=False)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Planar HSV -> RGB, inverse of `_rgb_to_hsv`."""
    h, s, v = hsv
    i = np.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int32) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b]).astype(hsv.dtype, copy=False)


def _adjust_saturation_and_hue(image: np.ndarray, factor: float, delta: float) -> np.ndarray:
    """`tf.image.adjust_saturation` then `adjust_hue`, in one HSV round trip (same result)."""
    hsv = _rgb_to_hsv(image)
    hsv[1] = np.clip(hsv[1] * np.float32(factor), 0, 1)
    hsv[0] = (hsv[0] + np.float32(delta)) % 1
    return _hsv_to_rgb(hsv)


def _adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Scales each channel's deviation from its mean, as `tf.image.adjust_contrast`."""
    mean = image.mean(axis=(1, 2), keepdims=True)
    return (image - mean) * np.float32(factor) + mean


def _color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, saturation, hue and contrast on a float32 [0, 1] HWC RGB image.

    One of the two orderings of the authors' code is chosen per image (they alternated by
    reader thread); the result is clipped to [0, 1].
    """
    brightness = rng.uniform(-IMAGENET_BRIGHTNESS_DELTA, IMAGENET_BRIGHTNESS_DELTA)
    saturation = rng.uniform(*IMAGENET_SATURATION_RANGE)
    hue = rng.uniform(-IMAGENET_HUE_DELTA, IMAGENET_HUE_DELTA)
    contrast = rng.uniform(*IMAGENET_CONTRAST_RANGE)
    planar = np.ascontiguousarray(image.transpose(2, 0, 1)) + np.float32(brightness)
    # Saturation is followed by hue in both orderings.
    if rng.random() < 0.5:
        planar = _adjust_saturation_and_hue(planar, saturation, hue)
        planar = _adjust_contrast(planar, contrast)
    else:
        planar = _adjust_contrast(planar, contrast)
        planar = _adjust_saturation_and_hue(planar, saturation, hue)
    return np.clip(planar, 0, 1).transpose(1, 2, 0)


def imagenet_train_transform(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    image_size: int = 224,
    color_jitter: bool = True,
) -> dict[str, np.ndarray]:
    """ImageNet training augmentation (Inception-style, as in the RevNet authors' code).

    A random crop covering 5%..100% of the image area with aspect ratio 3/4..4/3 (the whole
    image if 100 attempts find none) is resized bilinearly to `image_size` squared, flipped
    left-right with probability 1/2, colour-jittered (brightness +-32/255, saturation x0.5..1.5,
    hue +-0.2 of a turn, contrast x0.5..1.5, clipped to [0, 1]) and scaled to [-1, 1].

    Args:
      example: `{"image": uint8[H, W, 3], "label": int}` of any size.
      rng: per-record generator.
      image_size: output side length.
      color_jitter: apply the colour jitter.

    Returns:
      `{"image": float32[image_size, image_size, 3], "label": int32}`.
    """
    image = np.asarray(example["image"])
    top, left, h, w = _random_crop_box(image.shape[0], image.shape[1], rng)
    image = _resize(image[top : top + h, left : left + w], image_size, image_size)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image.astype(np.float32) / 255.0
    if color_jitter:
        image = _color_jitter(image, rng)
    return {
        "image": np.ascontiguousarray(image * 2 - 1, dtype=np.float32),
        "label": example_label(example),
    }


def imagenet_eval_transform(
    example: Mapping[str, Any], image_size: int = 224
) -> dict[str, np.ndarray]:
    """ImageNet evaluation, as in the RevNet authors' code: central 87.5 % crop, then resize.

    The crop keeps the central `IMAGENET_EVAL_CENTRAL_FRACTION` (0.875) of each side, with
    `tf.image.central_crop`'s rounding (offset `int((h - 0.875 h) / 2)`, size `h - 2 offset`),
    and is resized bilinearly to `image_size` squared, so a non-square image is squashed to a
    square, as the training crops are. The authors resize with TensorFlow's bilinear kernel; here
    PIL's, which also antialiases when shrinking.

    Args:
      example: `{"image": uint8[H, W, 3], "label": int}` of any size.
      image_size: output side length.

    Returns:
      `{"image": float32[image_size, image_size, 3]` in [-1, 1], `"label": int32}`.
    """
    image = np.asarray(example["image"])
    top, left, h, w = _central_crop_box(image.shape[0], image.shape[1])
    image = _resize(image[top : top + h, left : left + w], image_size, image_size)
    image = image.astype(np.float32) / 255.0
    return {"image": image * 2.0 - 1.0, "label": example_label(example)}


def _central_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """`(top, left, h, w)` of `tf.image.central_crop(image, IMAGENET_EVAL_CENTRAL_FRACTION)`."""
    fraction = IMAGENET_EVAL_CENTRAL_FRACTION
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    return top, left, height - 2 * top, width - 2 * left


def digits_image(example: Mapping[str, Any], image_size: int) -> np.ndarray:
    """A digits example's 8x8 image (uint8, values 0..16) resized to ``image_size`` squared
    (bilinear), the deterministic part of the digits transform both pipelines share."""
    image = np.asarray(example["image"])
    return _resize(image, image_size, image_size)


