"""The device-resident pipeline: the whole split in device memory, shuffled and augmented in jit.

For datasets that fit in device memory (CIFAR-10/100: 150 MB of uint8 for 50,000 training
images; digits) the prepared split is read once into a uint8 array on the devices. Each training
batch is then computed inside the compiled train step from three things only: the resident
arrays, the epoch's permutation (also on the device) and the step number. Nothing is copied from
the host per step, and the input of step k is a pure function of `(seed, k)`: resuming from a
checkpoint needs the step alone.

Per step k (with `steps_per_epoch = N // batch_size`, the last incomplete batch dropped):

- epoch `k // steps_per_epoch` has the permutation
  `jax.random.permutation(fold_in(shuffle_key, epoch), N)`, computed once per epoch;
- batch k is examples `perm[i * B : (i + 1) * B]`, `i = k % steps_per_epoch`, gathered;
- the augmentation draws from `fold_in(augment_key, k)`: crop offsets uniform on
  `0..2 * pad` per axis and a left-right flip with probability 1/2 for each example;
- the transform is the one of `revjax.data.transforms`, in JAX: CIFAR subtracts the per-pixel
  mean image of the training split, zero-pads by 2 to 36x36, crops 32x32 at the offsets and
  flips (0..255 units); digits (resized once on the host) are scaled to [0, 1] and, when
  augmented, shifted by up to one pixel. The result equals the numpy transform bit for bit for
  the same offsets and flips (tests/test_device_pipeline.py).

Layout over several devices and processes: the dataset is **replicated** on every device, and
each process places its own copy (it reads the whole split; each process's devices hold at least
that process's shard, as required). The global batch is computed under `jit` and constrained to
the data-parallel batch sharding, so XLA's partitioner has every device gather only its own rows
from its local copy: no communication, any permutation of the whole split, and batches identical
to a single-device run (the random bits are sharding-invariant under JAX's partitionable
Threefry). The price is memory: the whole split on every device (CIFAR: 150 MB + 30 MB test,
small next to an accelerator's memory); `fits_on_devices` checks it. Sharding the split instead
would save that memory but either restrict shuffling to within a device's shard (a different,
device-count-dependent order) or need an all-to-all per step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from revjax.data.sources import get_dataset_info, make_source, mean_image
from revjax.data.transforms import CIFAR_PAD, PIXEL_SCALE, digits_image

__all__ = [
    "DEVICE_DATASETS",
    "AugmentSpec",
    "DeviceEvalInput",
    "DeviceTrainInput",
    "augment_spec",
    "draw_augmentation",
    "fits_on_devices",
    "gather_transform",
    "load_split",
    "transform_batch",
]

_log = logging.getLogger(__name__)

DEVICE_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits")

# Fraction of the smallest device's memory the resident splits may use before `auto` picks Grain.
DEVICE_MEMORY_FRACTION = 0.25

DIGITS_SHIFT = 1  # the digits augmentation: a random shift of up to 1 pixel


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The static part of the jitted transform.

    Attributes:
      pad: zero padding on each side before a random crop of the original size (0: no crop).
      flip: random left-right flips with probability 1/2.
      subtract_mean: subtract the training split's per-pixel mean image (CIFAR).
      unit_range: scale 0..255 to [0, 1] by `PIXEL_SCALE` (digits; CIFAR stays in 0..255
        units, as in the authors' code).
    """

    pad: int
    flip: bool
    subtract_mean: bool
    unit_range: bool


def augment_spec(name: str, augment: bool) -> AugmentSpec:
    """The device transform of dataset `name` (training with `augment`, or evaluation)."""
    if name not in DEVICE_DATASETS:
        raise ValueError(
            f"{name!r} does not fit the device-resident pipeline (it supports "
            f"{', '.join(DEVICE_DATASETS)}); use input_pipeline='grain'."
        )
    if name == "digits":
        return AugmentSpec(DIGITS_SHIFT if augment else 0, False, False, True)
    return AugmentSpec(CIFAR_PAD if augment else 0, augment, True, False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split into memory: `(uint8[N, H, W, C], int32[N])`, in source order.

    Digits are resized to `image_size` here, once (the deterministic part of their transform).
    """
    size = get_dataset_info(name, image_size).image_shape[0]
    source = make_source(name, split, data_dir)
    n = len(source)
    if n == 0:
        raise ValueError(f"Split {split!r} of {name!r} is empty.")
    first = np.asarray(source[0]["image"])
    if name == "digits":
        first = digits_image(source[0], size)
    images = np.empty((n, *first.shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        example = source[i]
        image = digits_image(example, size) if name == "digits" else example["image"]
        images[i] = image
        labels[i] = int(example["label"])
    return images, labels


def fits_on_devices(nbytes: int, devices=None) -> bool:
    """Whether `nbytes` of resident data fit in `DEVICE_MEMORY_FRACTION` of every device.

    Devices that report no memory limit (CPU) count as fitting.
    """
    for device in devices if devices is not None else jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        limit = (stats or {}).get("bytes_limit")
        if limit and nbytes > DEVICE_MEMORY_FRACTION * limit:
            return False
    return True


def _replicated(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One copy per device; each process places its own (multi-process safe)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


# --------------------------------------------------------------------------------------------
# The jitted transform
# --------------------------------------------------------------------------------------------


def draw_augmentation(key: jax.Array, batch_size: int, spec: AugmentSpec):
    """Crop offsets `int32[B, 2]` (uniform on `0..2 * pad`) and flips `bool[B]` (p = 1/2)."""
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * spec.pad + 1, jnp.int32)
    if spec.flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
    else:
        flips = jnp.zeros((batch_size,), jnp.bool_)
    return offsets, flips


def transform_batch(
    images: jax.Array,
    mean: jax.Array | None,
    offsets: jax.Array | None,
    flips: jax.Array | None,
    spec: AugmentSpec,
) -> jax.Array:
    """The transform of `revjax.data.transforms` on a batch, in JAX.

    Args:
      images: uint8 `[B, H, W, C]`.
      mean: float32 `[H, W, C]` when `spec.subtract_mean`.
      offsets: int32 `[B, 2]` (top, left) of the crop in the padded image, when `spec.pad`.
      flips: bool `[B]`, when `spec.flip`.
      spec: what to apply.

    Returns:
      float32 `[B, H, W, C]`.
    """
    index = jnp.arange(images.shape[0], dtype=jnp.int32)
    return gather_transform(images, index, mean, offsets, flips, spec)


def gather_transform(
    images: jax.Array,
    index: jax.Array,
    mean: jax.Array | None,
    offsets: jax.Array | None,
    flips: jax.Array | None,
    spec: AugmentSpec,
) -> jax.Array:
    """`transform_batch(images[index], ...)` as one gather from the resident split.

    Padding, cropping and flipping only move pixels, so they fold into the gather's indices:
    output pixel (b, i, j) reads row `top_b + i - pad` and column `left_b + j - pad` (mirrored,
    `left_b + W - 1 - j - pad`, when flipped) of example `index[b]`, and is 0 where that falls in
    the padding. The arithmetic (uint8 -> float32, minus the mean at the same pixel, x 1/255) is
    the numpy transform's, so the result is bit-identical to it.

    Args:
      images: uint8 `[N, H, W, C]`, the split.
      index: int32 `[B]`, the examples to take.
      mean, offsets, flips, spec: as `transform_batch`.

    Returns:
      float32 `[B, H, W, C]`.
    """
    _, h, w, _ = images.shape
    b = index.shape[0]
    rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32), (b, h))  # [B, H]
    cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))  # [B, W]
    if spec.flip:
        cols = jnp.where(flips[:, None], w - 1 - cols, cols)
    if spec.pad:
        rows = rows + offsets[:, :1] - spec.pad
        cols = cols + offsets[:, 1:] - spec.pad
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    rows, cols = jnp.clip(rows, 0, h - 1)[:, :, None], jnp.clip(cols, 0, w - 1)[:, None, :]
    x = images[index[:, None, None], rows, cols].astype(jnp.float32)  # [B, H, W, C]
    if spec.subtract_mean:
        x = x - mean[rows, cols]
    if spec.unit_range:
        x = x * jnp.float32(PIXEL_SCALE)
    if spec.pad:
        x = jnp.where(inside[..., None], x, jnp.float32(0.0))
    return x


# --------------------------------------------------------------------------------------------
# Training input
# --------------------------------------------------------------------------------------------


class DeviceTrainInput:
    """The training split on the devices; batches are built inside the jitted train step.

    Use `wrap_step` to fuse the batch into a train step `(state, batch) -> out` whose state
    has a `step` field (the number of steps done), then call the fused step as
    `step_fn(state, *input.step_args(k))` for step k. `batch_at(k)` gives batch k outside a
    step (tests, the drift monitor).

    Args:
      name: one of `DEVICE_DATASETS`.
      batch_size: global batch size.
      seed: seed of the order and of the augmentation.
      batch_sharding: `NamedSharding` of a batch (sharded along the data axis); its mesh
        holds the replicated split.
      data_dir: TFDS data directory (None: TFDS default); ignored for digits.
      split: training split (default: the dataset's train split).
      image_size: output side length (digits only; CIFAR is 32).
      augment: None for the dataset default (CIFAR: on; digits: off).
      arrays: `(images, labels)` to use instead of reading the split (tests, benchmarks).
      mean: the mean image to use with `arrays` (default: `mean_image(name, data_dir)`).
    """

    kind = "device"

    def __init__(
        self,
        name: str,
        *,
        batch_size: int,
        seed: int,
        batch_sharding: NamedSharding,
        data_dir: str | os.PathLike | None = None,
        split: str | None = None,
        image_size: int | None = None,
        augment: bool | None = None,
        arrays: tuple[np.ndarray, np.ndarray] | None = None,
        mean: np.ndarray | None = None,
    ):
        info = get_dataset_info(name)
        augment = info.default_augment if augment is None else augment
        self.spec = augment_spec(name, augment)
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        if arrays is None:
            arrays = load_split(name, split or info.train_split, data_dir, image_size)
        images, labels = arrays
        self.num_examples = len(labels)
        self.batch_size = int(batch_size)
        self.steps_per_epoch = self.num_examples // self.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"The global batch size {batch_size} exceeds the {self.num_examples} training "
                "examples."
            )
        self.seed = int(seed)
        self.batch_sharding = batch_sharding
        self.replicated = NamedSharding(batch_sharding.mesh, P())
        if self.spec.subtract_mean and mean is None:
            mean = mean_image(name, data_dir)
        self.nbytes = images.nbytes + labels.nbytes
        self.data = {
            "images": _replicated(np.ascontiguousarray(images, np.uint8), self.replicated),
            "labels": _replicated(np.asarray(labels, np.int32), self.replicated),
        }
        if self.spec.subtract_mean:
            self.data["mean"] = _replicated(np.asarray(mean, np.float32), self.replicated)
        self._permutation_fn = jax.jit(
            functools.partial(epoch_permutation, seed=self.seed, n=self.num_examples),
            out_shardings=self.replicated,
        )
        self._epoch = None
        self._perm = None
        self._batch_fn = jax.jit(self.batch, out_shardings=batch_sharding)

    def permutation(self, epoch: int) -> jax.Array:
        """The order of epoch `epoch`, int32[N] on the devices (cached for the current epoch)."""
        if epoch != self._epoch:
            self._perm = self._permutation_fn(jnp.asarray(epoch, jnp.int32))
            self._epoch = epoch
        return self._perm

    def batch(self, data: dict, perm: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        """Batch `step` (traceable): `{"image": float32[B, H, W, C], "label": int32[B]}`."""
        step = jnp.asarray(step, jnp.int32)
        position = step % self.steps_per_epoch
        idx = jax.lax.dynamic_slice_in_dim(perm, position * self.batch_size, self.batch_size)
        # Under jit with a sharded output, each device gathers only its rows.
        idx = jax.lax.with_sharding_constraint(idx, self.batch_sharding)
        labels = jnp.take(data["labels"], idx, axis=0, mode="clip")
        offsets = flips = None
        if self.spec.pad or self.spec.flip:
            key = jax.random.fold_in(_keys(self.seed)[1], step)
            offsets, flips = draw_augmentation(key, self.batch_size, self.spec)
        image = gather_transform(
            data["images"], idx, data.get("mean"), offsets, flips, self.spec
        )
        return {
            "image": jax.lax.with_sharding_constraint(image, self.batch_sharding),
            "label": jax.lax.with_sharding_constraint(labels, self.batch_sharding),
        }

    def wrap_step(self, train_step):
        """`(state, batch) -> out` into `(state, data, perm) -> out`, the batch built inside."""

        def fused(state, data, perm):
            return train_step(state, self.batch(data, perm, state.step))

        return fused

    def step_args(self, step: int) -> tuple:
        """The arguments after `state` of the fused step that performs step `step` (0-based)."""
        return self.data, self.permutation(step // self.steps_per_epoch)

    def arg_shardings(self) -> tuple:
        return jax.tree.map(lambda _: self.replicated, self.data), self.replicated

    def batch_at(self, step: int) -> dict[str, jax.Array]:
        """Batch `step` (0-based), computed outside a train step."""
        perm = self.permutation(step // self.steps_per_epoch)
        return self._batch_fn(self.data, perm, jnp.asarray(step, jnp.int32))

    def get_state(self) -> dict:
        """Nothing to store: the input of step k depends on the seed and k only."""
        return {"input_pipeline": self.kind}

    def set_state(self, state: dict) -> None:
        if state.get("input_pipeline") != self.kind:
            raise ValueError(
                "This checkpoint was written with the Grain input pipeline; resume it with "
                "TrainConfig(input_pipeline='grain') (the device pipeline gives another order)."
            )

    def close(self) -> None:
        pass


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
    shuffle_key, augment_key = jax.random.split(jax.random.key(seed))
    return shuffle_key, augment_key


def epoch_permutation(epoch: jax.Array, *, seed: int, n: int) -> jax.Array:
    """The order of the examples in epoch `epoch`: int32[n], a permutation of 0..n-1."""
    key = jax.random.fold_in(_keys(seed)[0], epoch)
    return jax.random.permutation(key, n).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Evaluation input
# --------------------------------------------------------------------------------------------


class DeviceEvalInput:
    """The evaluation split on the devices, yielded as masked global batches.

    The split is padded with zero images to a multiple of the batch size; `mask` is 1.0 on real
    examples and 0.0 on padding, in split order, as `revjax.data.eval_iterator`.
    """

    def __init__(
        self,
        name: str,
        *,
        batch_size: int,
        batch_sharding: NamedSharding,
        data_dir: str | os.PathLike | None = None,
        split: str | None = None,
        image_size: int | None = None,
        arrays: tuple[np.ndarray, np.ndarray] | None = None,
        mean: np.ndarray | None = None,
    ):
        info = get_dataset_info(name)
        self.spec = augment_spec(name, False)
        if arrays is None:
            arrays = load_split(name, split or info.eval_split, data_dir, image_size)
        images, labels = arrays
        n = len(labels)
        self.batch_size = int(batch_size)
        self.num_batches = math.ceil(n / self.batch_size)
        pad = self.num_batches * self.batch_size - n
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
        labels = np.concatenate([np.asarray(labels, np.int32), np.zeros((pad,), np.int32)])
        mask = (np.arange(len(labels)) < n).astype(np.float32)
        replicated = NamedSharding(batch_sharding.mesh, P())
        if self.spec.subtract_mean and mean is None:
            mean = mean_image(name, data_dir)
        self.nbytes = images.nbytes + labels.nbytes
        self.data = {
            "images": _replicated(images, replicated),
            "labels": _replicated(labels, replicated),
            "mask": _replicated(mask, replicated),
        }
        if self.spec.subtract_mean:
            self.data["mean"] = _replicated(np.asarray(mean, np.float32), replicated)
        self.batch_sharding = batch_sharding
        self._batch_fn = jax.jit(self._batch, out_shardings=batch_sharding)

    def _batch(self, data: dict, k: jax.Array) -> dict[str, jax.Array]:
        start = k * self.batch_size
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, self.batch_size)  # noqa: E731
        image = transform_batch(take(data["images"]), data.get("mean"), None, None, self.spec)
        return {"image": image, "label": take(data["labels"]), "mask": take(data["mask"])}

    def __iter__(self):
        for k in range(self.num_batches):
            yield self._batch_fn(self.data, jnp.asarray(k, jnp.int32))

    def __len__(self) -> int:
        return self.num_batches
