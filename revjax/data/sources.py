"""Where examples come from: dataset descriptions, random-access sources, the CIFAR mean image.

A source is anything with `__len__` and `__getitem__` returning `{"image": uint8[H, W, C],
"label": int}`: a TFDS ArrayRecord data source (read without TensorFlow, from files that
`python -m revjax.prepare` wrote) or `DigitsSource` (scikit-learn's digits, offline).
`load_split` reads a whole split into two numpy arrays, for the device-resident pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

_log = logging.getLogger(__name__)

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


def digits_arrays(
    split: str, classes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`DigitsSource` ``split`` as arrays, for hand-written loops: ``(images, labels)``, images
    float32 [N, 8, 8, 1] in [0, 1], labels int32.

    Args:
      split: ``"train"`` or ``"test"`` (the same fixed split as `DigitsSource`).
      classes: keep these digits only, labelled by their position in ``classes`` (``range(5,
        10)``: digit 5 is label 0); ``None``: all ten, labelled as themselves.
    """
    source = DigitsSource(split)
    images, labels = source._images, source._labels
    if classes is not None:
        position = {int(c): i for i, c in enumerate(classes)}
        keep = np.isin(labels, list(position))
        images = images[keep]
        labels = np.asarray([position[int(label)] for label in labels[keep]])
    return (images / 255.0).astype(np.float32), np.asarray(labels, np.int32)


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


def make_source(
    name: str, split: str, data_dir: str | os.PathLike | None = None, *, encoded: bool = False
):
    """Returns a random-access source of raw examples `{"image": uint8[H, W, C], "label": int}`.

    TFDS examples carry extra keys (`id`, `file_name`, `coarse_label`); the pipelines ignore them.

    Args:
      name: one of `KNOWN_DATASETS`.
      split: a split name (TFDS slicing such as `"train[:10%]"` works for TFDS datasets).
      data_dir: TFDS data directory (None: the TFDS default, `$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`); ignored for digits.
      encoded: leave TFDS images encoded (`"image"` is the stored JPEG/PNG bytes), for
        decoders that decode only what they need (`revjax.data.imagenet`).

    Returns:
      An object with `__len__` and `__getitem__`.

    Raises:
      DatasetNotPreparedError: the TFDS dataset was not prepared in `data_dir`.
    """
    info = _check_name(name)
    if not info.uses_tfds:
        return DigitsSource(split)
    import tensorflow_datasets as tfds

    decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
            decoders=decoders,
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


