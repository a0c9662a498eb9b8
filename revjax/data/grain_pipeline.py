"""The Grain pipeline: shuffled, augmented, batched `grain.MapDataset`s and their iterators.

Every dataset can go through it; ImageNet must (it does not fit in device memory). A source is
shuffled, augmented per example with the numpy transforms of `revjax.data.transforms` and
batched, and iterated through a checkpointable `grain.DatasetIterator` (`get_state()` /
`set_state()` resume exactly), optionally in worker processes (`num_workers`, Grain's
`mp_prefetch`). `DevicePrefetcher` moves the next batches to the devices from a background
thread, so host-to-device copies overlap the train step.

Determinism: the order of examples depends only on the seed and the epoch; the augmentation of an
example only on the seed and its position in the stream (Grain's `random_map` seeds one numpy
generator per record). The same seed therefore gives the same batches on every run, after a
restore, and with any number of reader threads or worker processes.

Multi-host: every process builds the same global stream and keeps every `process_count`-th
example, starting at `process_index`. The per-process batches of step k together hold exactly
the examples of global batch k of a single-process run (interleaved), so results do not depend
on how many hosts read the data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from revjax.data.sources import get_dataset_info, make_source, mean_image
from revjax.data.transforms import (
    PIXEL_SCALE,
    cifar_eval_transform,
    cifar_train_transform,
    digits_image,
    example_label,
    imagenet_eval_transform,
    imagenet_train_transform,
)

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
        image = digits_image(example, self.image_size)
        if self.augment:
            h, w = image.shape[:2]
            padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
            top, left = rng.integers(0, 3, size=2)
            image = padded[top : top + h, left : left + w]
        return {"image": image.astype(np.float32) * PIXEL_SCALE, "label": example_label(example)}


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
            image = digits_image(example, self.image_size)
            out = {"image": image.astype(np.float32) * PIXEL_SCALE, "label": example_label(example)}
        out["mask"] = np.float32(1.0)
        return out


@dataclasses.dataclass(frozen=True)
class PadExample:
    """Grain `map` step: the padding of evaluation batches, a zero image of `shape` and `dtype`
    with label 0 and mask 0.0."""

    shape: tuple[int, int, int]
    dtype: str = "float32"

    def __call__(self, _: int) -> dict:
        return {
            "image": np.zeros(self.shape, self.dtype),
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
    info = get_dataset_info(name, image_size)
    _check_sharding(batch_size, process_index, process_count)
    image_size = info.image_shape[0]
    augment = info.default_augment if augment is None else augment
    _seeds(seed)  # checked before the (possibly slow) source is opened
    source = make_source(name, split or info.train_split, data_dir)
    transform = _TrainTransform(name, augment, image_size, _mean_for(name, data_dir))
    return stream_from_source(
        source, transform, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count,
    )


def stream_from_source(
    source,
    transform,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    batch_fn=None,
) -> grain.MapDataset:
    """The infinite, shuffled, augmented training stream of per-process batches of any source.

    Args:
      source: random-access examples (`__len__`, `__getitem__`); picklable for worker processes.
      transform: `(example, numpy Generator) -> example`, picklable (a module-level callable).
      batch_size, seed, process_index, process_count: as `train_iterator`.
      batch_fn: Grain's `batch_fn` (None: stack arrays), e.g. to keep ragged JPEG bytes apart.
    """
    local_batch = _check_sharding(batch_size, process_index, process_count)
    shuffle_seed, augment_seed = _seeds(seed)
    steps_per_epoch = len(source) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"The global batch size {batch_size} exceeds the {len(source)} training examples."
        )
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    # After the shuffle, so an example's augmentation is keyed by its position in the stream.
    ds = ds.random_map(transform, seed=augment_seed)
    # Drop the last, incomplete global batch of each epoch, then give each process every
    # process_count-th example: all processes see the same number of batches per epoch.
    ds = ds[: steps_per_epoch * batch_size][process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=batch_fn)
    # Infinite; each epoch is shuffled and augmented afresh (indices past an epoch carry it).
    return ds.repeat()


def iterate(ds: grain.MapDataset, num_threads: int | None = None, num_workers: int = 0):
    """A checkpointable iterator over `ds` with reader threads and worker processes."""
    return _iterate(ds, num_threads, num_workers)


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
    info = get_dataset_info(name, image_size)
    _check_sharding(batch_size, process_index, process_count)  # before opening the source
    image_size = info.image_shape[0]
    source = make_source(name, split or info.eval_split, data_dir)
    return eval_stream_from_source(
        source, _EvalTransform(name, image_size, _mean_for(name, data_dir)),
        batch_size=batch_size, pad=PadExample((image_size, image_size, info.image_shape[2])),
        process_index=process_index, process_count=process_count,
    )


def eval_stream_from_source(
    source,
    transform,
    *,
    batch_size: int,
    pad: PadExample,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The finite evaluation stream of per-process batches of any source: every example once,
    in split order, padded with ``pad``'s examples (mask 0) to a multiple of the global batch
    size; process p takes every ``process_count``-th example from p.

    Args:
      source: random-access examples (`__len__`, `__getitem__`).
      transform: `example -> example` with a ``mask`` of 1.0, picklable.
      batch_size, process_index, process_count: as `eval_iterator`.
      pad: the padding example (its image's shape and dtype are the transform's output's).
    """
    local_batch = _check_sharding(batch_size, process_index, process_count)
    n = len(source)
    padded = math.ceil(n / batch_size) * batch_size
    ds = grain.MapDataset.source(source).map(transform)
    if padded > n:
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.range(padded - n).map(pad)])
    return ds[process_index::process_count].batch(local_batch, drop_remainder=True)


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


# --------------------------------------------------------------------------------------------
# Feeding the devices
# --------------------------------------------------------------------------------------------


def global_batch(local: Mapping[str, np.ndarray], sharding) -> dict:
    """Assembles this process's part of a batch into one global `jax.Array` per key.

    Values that are already a `jax.Array` (the device pipeline's batches) pass through.
    """
    import jax

    return {
        k: v if isinstance(v, jax.Array)
        else jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local.items()
    }


class DevicePrefetcher:
    """Moves the next batches of a Grain iterator to the devices from a background thread.

    While the devices run step k, the thread reads batch k + 1 (.. k + `depth`) and starts its
    host-to-device copy, so the copy overlaps the step. `get_state()` is the iterator state
    after the last batch handed out (not after the prefetched ones), so a checkpoint resumes
    exactly. Call `set_state` before the first `next`.

    Args:
      iterator: a `grain.DatasetIterator` of per-process numpy batches.
      sharding: the global batch `NamedSharding`.
      depth: batches in flight (>= 1).
    """

    def __init__(self, iterator, sharding, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}.")
        self._it = iterator
        self._sharding = sharding
        self._depth = depth
        self._queue = None
        self._thread = None
        self._stop = None
        self._state = iterator.get_state()

    def _start(self) -> None:
        import queue
        import threading

        self._queue = queue.Queue(maxsize=self._depth)
        self._stop = threading.Event()

        def produce():
            try:
                while not self._stop.is_set():
                    local = next(self._it)
                    item = (global_batch(local, self._sharding), self._it.get_state())
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as e:  # handed to the consumer
                self._queue.put((e, None))

        self._thread = threading.Thread(target=produce, name="revjax-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._start()
        batch, state = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        self._state = state
        return batch

    def get_state(self):
        return self._state

    def set_state(self, state) -> None:
        if self._thread is not None:
            raise RuntimeError("set_state must come before the first batch is read.")
        self._it.set_state(state)
        self._state = state

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class GrainTrainInput:
    """Training input through Grain, with the same interface as `DeviceTrainInput`.

    The train step takes the batch itself: `step_fn(state, *input.step_args(k))` with
    `step_args(k) == (next global batch,)`, prefetched to the devices.
    """

    kind = "grain"

    def __init__(self, iterator, batch_sharding, prefetch: int = 2):
        self.batch_sharding = batch_sharding
        self._feed = DevicePrefetcher(iterator, batch_sharding, prefetch)
        self._last = None

    def wrap_step(self, train_step):
        return train_step

    def step_args(self, step: int) -> tuple:
        self._last = next(self._feed)
        return (self._last,)

    def arg_shardings(self) -> tuple:
        return (self.batch_sharding,)

    def batch_at(self, step: int) -> dict:
        """The batch of the last step (only that one is kept)."""
        if self._last is None:
            raise ValueError("No batch was read yet.")
        return self._last

    def get_state(self) -> dict:
        return {"input_pipeline": self.kind, "iterator": self._feed.get_state()}

    def set_state(self, state: dict) -> None:
        kind = state.get("input_pipeline", self.kind)  # older checkpoints: the bare state
        if kind != self.kind:
            raise ValueError(
                f"This checkpoint was written with the {kind} input pipeline; resume it with "
                f"TrainConfig(input_pipeline={kind!r}) (the {self.kind} pipeline gives another "
                "order or other pixels)."
            )
        self._feed.set_state(state.get("iterator", state))

    def close(self) -> None:
        self._feed.close()
