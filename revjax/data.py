"""Input pipelines: TFDS CIFAR-10/100 and ImageNet, plus scikit-learn's digits offline.

Every dataset goes through the same Grain pipeline: a random-access source (a TFDS
ArrayRecord data source, or `DigitsSource`) is shuffled, augmented and batched as a
`grain.MapDataset`, and iterated through a checkpointable `grain.DatasetIterator`
(`get_state()` / `set_state()` resume exactly, so the trainer can store the input position in
its checkpoints).

Reading never imports TensorFlow: TFDS data are read with
`tfds.data_source(..., download=False)` from ArrayRecord files that `python -m revjax.prepare`
wrote once (that step needs TensorFlow, the `revjax[prepare]` extra). Images are augmented with
numpy and PIL.

Determinism: the order of examples depends only on the seed and the epoch; the augmentation of an
example only on the seed and its position in the stream (Grain's `random_map` seeds one numpy
generator per record). The same seed therefore gives the same batches on every run, after a
restore, and with any number of reader threads or worker processes.

Multi-host: every process builds the same global stream and keeps every `process_count`-th
example, starting at `process_index`. The per-process batches of step k together hold exactly
the examples of global batch k of a single-process run (interleaved), so results do not depend
on how many hosts read the data.

Typical use::

    info = get_dataset_info("cifar10")
    train_it = train_iterator("cifar10", batch_size=128, seed=0, data_dir=data_dir)
    batch = next(train_it)          # {"image": float32[128, 32, 32, 3], "label": int32[128]}
    state = train_it.get_state()    # store in the checkpoint (a small JSON-able dict)
    train_it.set_state(state)       # on restore, on a freshly built iterator
    for batch in eval_iterator("cifar10", batch_size=500, data_dir=data_dir):
        ...                         # batch["mask"] is 0.0 on padding rows
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

__all__ = [
    "DatasetInfo",
    "DatasetNotPreparedError",
    "DigitsSource",
    "KNOWN_DATASETS",
    "TFDS_DATASETS",
    "cifar_eval_transform",
    "cifar_train_transform",
    "eval_dataset",
    "eval_iterator",
    "get_dataset_info",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "make_source",
    "mean_image",
    "prepare_command",
    "train_dataset",
    "train_iterator",
]

_log = logging.getLogger(__name__)

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

DIGITS_NUM_TRAIN = 1497
DIGITS_NUM_TEST = 300
DIGITS_SPLIT_SEED = 0

_MEAN_IMAGE_FILE = "revjax_mean_image_train.npy"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer and the model need to know about a dataset.

    Attributes:
      name: dataset name (`cifar10`, `cifar100`, `imagenet2012` or `digits`).
      num_classes: number of label classes.
      image_shape: `(H, W, C)` of the images the pipelines produce (after `image_size`).
      train_split: name of the split used for training.
      eval_split: name of the split used for evaluation.
      num_train: examples in the full, real training split (`len(make_source(...))` gives
        what is on disk, e.g. under mock data or a sliced split).
      num_eval: examples in the full, real evaluation split.
      uses_tfds: True when the data are read from prepared TFDS files.
      default_augment: whether training augments by default.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train_split: str
    eval_split: str
    num_train: int
    num_eval: int
    uses_tfds: bool
    default_augment: bool

    def steps_per_epoch(self, batch_size: int) -> int:
        """Returns the number of full global training batches in one epoch."""
        return self.num_train // batch_size


_INFOS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), "train", "test", 50_000, 10_000, True, True),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), "train", "test", 50_000, 10_000, True, True
    ),
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, (224, 224, 3), "train", "validation", 1_281_167, 50_000, True, True
    ),
    "digits": DatasetInfo(
        "digits", 10, (8, 8, 1), "train", "test", DIGITS_NUM_TRAIN, DIGITS_NUM_TEST, False, False
    ),
}

KNOWN_DATASETS: tuple[str, ...] = tuple(_INFOS)
TFDS_DATASETS: tuple[str, ...] = tuple(n for n, i in _INFOS.items() if i.uses_tfds)


class DatasetNotPreparedError(FileNotFoundError):
    """Raised when a TFDS dataset has not been prepared as ArrayRecord files in `data_dir`."""


def _check_name(name: str) -> DatasetInfo:
    if name not in _INFOS:
        raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}.")
    return _INFOS[name]


def get_dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """Returns the static description of a dataset.

    Args:
      name: one of `KNOWN_DATASETS`.
      image_size: output side length the pipelines will produce, if not the dataset's default
        (ImageNet: any size; digits: any size, by bilinear resizing; CIFAR: only 32).

    Returns:
      A `DatasetInfo`; split sizes are those of the full, real dataset.
    """
    info = _check_name(name)
    size = _resolve_image_size(info, image_size)
    return dataclasses.replace(info, image_shape=(size, size, info.image_shape[2]))


def _resolve_image_size(info: DatasetInfo, image_size: int | None) -> int:
    if image_size is None:
        return info.image_shape[0]
    if not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if info.name in ("cifar10", "cifar100") and image_size != 32:
        raise ValueError(
            f"{info.name} images are 32x32 and its augmentation is defined for that size; "
            f"got image_size={image_size}."
        )
    return int(image_size)


def _default_data_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    import tensorflow_datasets as tfds

    return tfds.core.constants.DATA_DIR


def prepare_command(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Returns instructions (with the exact shell commands) to prepare a TFDS dataset.

    Args:
      name: one of `TFDS_DATASETS`.
      data_dir: the TFDS data directory the trainer reads; None for the TFDS default.

    Returns:
      A multi-line message for the user.
    """
    _check_name(name)
    data_dir = _default_data_dir(data_dir)
    lines = [
        "Prepare it once (this step needs TensorFlow; training does not):",
        "    pip install 'revjax[prepare]'",
    ]
    if name == "imagenet2012":
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        lines += [
            "ImageNet cannot be downloaded automatically. Download ILSVRC2012_img_train.tar and",
            "ILSVRC2012_img_val.tar from https://image-net.org/ and put both files in",
            f"    {manual_dir}",
            "(or in another directory passed as --manual_dir), then run:",
            f"    python -m revjax.prepare imagenet2012 --data_dir {data_dir} "
            f"--manual_dir {manual_dir}",
        ]
    else:
        lines.append(f"    python -m revjax.prepare {name} --data_dir {data_dir}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loads digits once: uint8 images [1797, 8, 8, 1], labels, and the seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to the usual 0..255 byte range so all sources share one format.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    for arr in (images, labels, order):
        arr.setflags(write=False)
    return images, labels, order


class DigitsSource:
    """scikit-learn's digits as a random-access source: `{"image": uint8[8, 8, 1], "label": int}`.

    The 1797 images (values 0..16, scaled to 0..255 by `round(v * 255 / 16)`) are split once by
    a fixed permutation (`numpy.random.default_rng(0)`): the first 1497 permuted examples are
    `train`, the last 300 `test`. It needs no download and no TensorFlow.

    Args:
      split: `"train"` or `"test"`.
    """

    def __init__(self, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"digits has splits 'train' and 'test', got {split!r}.")
        self.split = split
        images, labels, order = _digits_arrays()
        idx = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
        self._images = images[idx]
        self._labels = labels[idx]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, len={len(self)})"


def make_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """Returns a random-access source of raw examples `{"image": uint8[H, W, C], "label": int}`.

    TFDS examples carry extra keys (`id`, `file_name`, `coarse_label`); the pipelines ignore them.

    Args:
      name: one of `KNOWN_DATASETS`.
      split: a split name (TFDS slicing such as `"train[:10%]"` works for TFDS datasets).
      data_dir: TFDS data directory (None: the TFDS default, `$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`); ignored for digits.

    Returns:
      An object with `__len__` and `__getitem__`.

    Raises:
      DatasetNotPreparedError: the TFDS dataset was not prepared in `data_dir`.
    """
    info = _check_name(name)
    if not info.uses_tfds:
        return DigitsSource(split)
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
        )
    except Exception as e:
        # Without prepared files TFDS raises assorted errors (e.g. NotImplementedError about
        # the TFRECORD format): check what is on disk and say what to do instead.
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
        if builder.is_prepared():
            raise
        raise DatasetNotPreparedError(
            f"Dataset {name!r} is not prepared in {builder.data_dir!r} (reading split "
            f"{split!r} failed: {type(e).__name__}).\n{prepare_command(name, data_dir)}"
        ) from e


# --------------------------------------------------------------------------------------------
# Mean image (CIFAR)
# --------------------------------------------------------------------------------------------

_MEAN_CACHE: dict[tuple[str, str, int], np.ndarray] = {}


def _compute_mean_image(source) -> np.ndarray:
    total = None
    for i in range(len(source)):
        image = np.asarray(source[i]["image"], dtype=np.float64)
        total = image if total is None else total + image
    if total is None:
        raise ValueError("Cannot compute a mean image of an empty split.")
    return (total / len(source)).astype(np.float32)


def mean_image(name: str, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Returns the per-pixel mean image of the full training split, float32 in 0..255 units.

    Computed once from the training split; for prepared TFDS data it is cached as
    `revjax_mean_image_train.npy` in the dataset's version directory (when writable), and in
    memory for the process. Mock data (`tfds.testing.mock_data`) are averaged on the fly.

    Args:
      name: one of `KNOWN_DATASETS`.
      data_dir: TFDS data directory (see `make_source`).

    Returns:
      float32 array of shape `(H, W, C)` of the stored images.

    Raises:
      ValueError: for imagenet2012, whose images have no common shape.
    """
    info = _check_name(name)
    if name == "imagenet2012":
        raise ValueError(
            "imagenet2012 images vary in size, so there is no mean image; its pipeline scales "
            "pixels to [-1, 1] instead."
        )
    source = make_source(name, info.train_split, data_dir)
    key = (name, "" if data_dir is None else os.fspath(data_dir), len(source))
    if key in _MEAN_CACHE:
        return _MEAN_CACHE[key]
    cache_path = None
    if info.uses_tfds:
        import tensorflow_datasets as tfds

        version_dir = tfds.builder(
            name, data_dir=None if data_dir is None else os.fspath(data_dir)
        ).data_dir
        # Only real prepared data have dataset_info.json; mock data point into the TFDS package.
        if os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
            cache_path = os.path.join(version_dir, _MEAN_IMAGE_FILE)
    mean = None
    if cache_path is not None and os.path.isfile(cache_path):
        mean = np.load(cache_path)
        if mean.dtype != np.float32 or mean.ndim != 3:
            _log.warning("Ignoring malformed mean image cache %s", cache_path)
            mean = None
    if mean is None:
        _log.info(
            "Computing the mean image of %s/%s (%d images)", name, info.train_split, len(source)
        )
        mean = _compute_mean_image(source)
        if cache_path is not None:
            _save_atomically(cache_path, mean)
    mean.setflags(write=False)
    _MEAN_CACHE[key] = mean
    return mean


def _save_atomically(path: str, array: np.ndarray) -> None:
    # Several processes may compute the mean at once: write a temporary file, then rename.
    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
    except OSError as e:  # read-only data dir: the in-memory copy is enough
        _log.info("Not caching the mean image in %s: %s", directory, e)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Per-example transforms (numpy + PIL). Each returns {"image": float32[H, W, C], "label": int32}.
# --------------------------------------------------------------------------------------------


def _label(example: Mapping[str, Any]) -> np.int32:
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
    return {"image": np.ascontiguousarray(image), "label": _label(example)}


def cifar_eval_transform(example: Mapping[str, Any], mean: np.ndarray) -> dict[str, np.ndarray]:
    """CIFAR evaluation preprocessing: mean subtraction only (0..255 units)."""
    image = np.asarray(example["image"], dtype=np.float32) - mean
    return {"image": image, "label": _label(example)}


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
        "label": _label(example),
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
    return {"image": image * 2.0 - 1.0, "label": _label(example)}


def _central_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """`(top, left, h, w)` of `tf.image.central_crop(image, IMAGENET_EVAL_CENTRAL_FRACTION)`."""
    fraction = IMAGENET_EVAL_CENTRAL_FRACTION
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    return top, left, height - 2 * top, width - 2 * left


def _digits_image(example: Mapping[str, Any], image_size: int) -> np.ndarray:
    image = np.asarray(example["image"])
    return _resize(image, image_size, image_size)


# The pipeline steps are module-level callables (not closures) so that Grain worker processes
# can pickle them.


@dataclasses.dataclass(frozen=True)
class _TrainTransform:
    name: str
    augment: bool
    image_size: int
    mean: np.ndarray | None

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
        if self.name in ("cifar10", "cifar100"):
            if self.augment:
                return cifar_train_transform(example, rng, self.mean)
            return cifar_eval_transform(example, self.mean)
        if self.name == "imagenet2012":
            if self.augment:
                return imagenet_train_transform(example, rng, self.image_size)
            return imagenet_eval_transform(example, self.image_size)
        # digits: optional light augmentation, a random shift of up to 1 pixel.
        image = _digits_image(example, self.image_size)
        if self.augment:
            h, w = image.shape[:2]
            padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
            top, left = rng.integers(0, 3, size=2)
            image = padded[top : top + h, left : left + w]
        return {"image": image.astype(np.float32) / 255.0, "label": _label(example)}


@dataclasses.dataclass(frozen=True)
class _EvalTransform:
    name: str
    image_size: int
    mean: np.ndarray | None

    def __call__(self, example: Mapping[str, Any]) -> dict:
        if self.name in ("cifar10", "cifar100"):
            out = cifar_eval_transform(example, self.mean)
        elif self.name == "imagenet2012":
            out = imagenet_eval_transform(example, self.image_size)
        else:
            image = _digits_image(example, self.image_size)
            out = {"image": image.astype(np.float32) / 255.0, "label": _label(example)}
        out["mask"] = np.float32(1.0)
        return out


@dataclasses.dataclass(frozen=True)
class _PadExample:
    shape: tuple[int, int, int]

    def __call__(self, _: int) -> dict:
        return {
            "image": np.zeros(self.shape, np.float32),
            "label": np.int32(0),
            "mask": np.float32(0.0),
        }


# --------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got process_index={process_index}, "
            f"process_count={process_count}."
        )
    if batch_size % process_count:
        raise ValueError(
            f"The global batch size {batch_size} is not divisible by the number of processes "
            f"{process_count}."
        )
    return batch_size // process_count


def _seeds(seed: int) -> tuple[int, int]:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    shuffle_seed, augment_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


def _iterate(
    ds: grain.MapDataset, num_threads: int | None, num_workers: int
) -> grain.DatasetIterator:
    """Turns a dataset of batches into a checkpointable iterator."""
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    if num_threads < 0 or num_workers < 0:
        raise ValueError(
            f"num_threads and num_workers must be >= 0, got {num_threads}, {num_workers}."
        )
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, 2 * num_threads))
    )
    if num_workers > 0:
        # Grain's workers read an absl flag; outside an absl app nobody parsed the flags.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


def _mean_for(name: str, data_dir) -> np.ndarray | None:
    return mean_image(name, data_dir) if name in ("cifar10", "cifar100") else None


def train_dataset(
    name: str,
    *,
    batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    augment: bool | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Returns the infinite training stream of per-process batches as a `grain.MapDataset`.

    See `train_iterator` for the arguments; `ds[k]` is this process's part of global batch k.
    """
    info = _check_name(name)
    local_batch = _check_sharding(batch_size, process_index, process_count)
    image_size = _resolve_image_size(info, image_size)
    augment = info.default_augment if augment is None else augment
    shuffle_seed, augment_seed = _seeds(seed)
    source = make_source(name, split or info.train_split, data_dir)
    steps_per_epoch = len(source) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"The global batch size {batch_size} exceeds the {len(source)} training examples."
        )
    transform = _TrainTransform(name, augment, image_size, _mean_for(name, data_dir))
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    # After the shuffle, so an example's augmentation is keyed by its position in the stream.
    ds = ds.random_map(transform, seed=augment_seed)
    # Drop the last, incomplete global batch of each epoch, then give each process every
    # process_count-th example: all processes see the same number of batches per epoch.
    ds = ds[: steps_per_epoch * batch_size][process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    # Infinite; each epoch is shuffled and augmented afresh (indices past an epoch carry it).
    return ds.repeat()


def train_iterator(
    name: str,
    *,
    batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    augment: bool | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int | None = None,
    num_workers: int = 0,
) -> grain.DatasetIterator:
    """Returns an infinite, checkpointable iterator over shuffled, augmented training batches.

    Each epoch is a fresh permutation of the split (seeded by `seed` and the epoch), cut into
    `len(split) // batch_size` full global batches; the remaining examples of that epoch are
    skipped. Use `it.get_state()` (a small dict of ints, JSON-able) to save the position and
    `it.set_state(state)` on a newly built iterator with the same arguments to resume exactly.

    Args:
      name: one of `KNOWN_DATASETS`.
      batch_size: global batch size over all processes.
      seed: seed of the order and of the augmentation.
      data_dir: TFDS data directory (None: TFDS default); ignored for digits.
      split: training split (default: the dataset's train split).
      image_size: output side length (see `get_dataset_info`).
      augment: None for the dataset default (CIFAR, ImageNet: on; digits: off). Off means the
        evaluation preprocessing.
      process_index: this process's index (`jax.process_index()`).
      process_count: number of processes (`jax.process_count()`).
      num_threads: reader threads in this process (default: min(8, CPU count)).
      num_workers: Grain worker processes (0: none; use some for ImageNet).

    Returns:
      A `grain.DatasetIterator` of `{"image": float32[B, H, W, C], "label": int32[B]}` with
      `B = batch_size // process_count`. Its state's layout depends on `num_workers`: restore
      into an iterator built with the same arguments.

    Raises:
      ValueError: unknown dataset, bad batch size / process arguments.
      DatasetNotPreparedError: TFDS data missing in `data_dir`.
    """
    ds = train_dataset(
        name,
        batch_size=batch_size,
        seed=seed,
        data_dir=data_dir,
        split=split,
        image_size=image_size,
        augment=augment,
        process_index=process_index,
        process_count=process_count,
    )
    return _iterate(ds, num_threads, num_workers)


def eval_dataset(
    name: str,
    *,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Returns the finite evaluation stream of per-process batches as a `grain.MapDataset`.

    See `eval_iterator` for the arguments.
    """
    info = _check_name(name)
    local_batch = _check_sharding(batch_size, process_index, process_count)
    image_size = _resolve_image_size(info, image_size)
    source = make_source(name, split or info.eval_split, data_dir)
    n = len(source)
    padded = math.ceil(n / batch_size) * batch_size
    ds = grain.MapDataset.source(source).map(
        _EvalTransform(name, image_size, _mean_for(name, data_dir))
    )
    if padded > n:
        shape = (image_size, image_size, info.image_shape[2])
        pad = grain.MapDataset.range(padded - n).map(_PadExample(shape))
        ds = grain.MapDataset.concatenate([ds, pad])
    ds = ds[process_index::process_count]
    return ds.batch(local_batch, drop_remainder=True)


def eval_iterator(
    name: str,
    *,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int | None = None,
    num_workers: int = 0,
) -> grain.DatasetIterator:
    """Returns a finite iterator over the whole evaluation split, without augmentation.

    With one process the examples come in split order; with several, process p gets examples
    p, p + process_count, ... of the (padded) split.

    The split is padded with zero images to a multiple of the global batch size; every batch is
    full and carries `mask` (1.0 for real examples, 0.0 for padding), so metrics summed with the
    mask and divided by `mask.sum()` (summed over processes) are exact. All processes yield the
    same number of batches, `ceil(len(split) / batch_size)`.

    Args:
      name: one of `KNOWN_DATASETS`.
      batch_size: global batch size over all processes.
      data_dir: TFDS data directory (None: TFDS default); ignored for digits.
      split: evaluation split (default: the dataset's eval split).
      image_size: output side length (see `get_dataset_info`).
      process_index: this process's index (`jax.process_index()`).
      process_count: number of processes (`jax.process_count()`).
      num_threads: reader threads in this process (default: min(8, CPU count)).
      num_workers: Grain worker processes (0: none).

    Returns:
      A `grain.DatasetIterator` of `{"image": float32[B, H, W, C], "label": int32[B],
      "mask": float32[B]}` with `B = batch_size // process_count`.
    """
    ds = eval_dataset(
        name,
        batch_size=batch_size,
        data_dir=data_dir,
        split=split,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
    )
    return _iterate(ds, num_threads, num_workers)
