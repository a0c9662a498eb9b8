"""The device-resident input pipeline: equal to the numpy reference, uniform, a permutation per
epoch, independent of the device count, and what the trainer uses for CIFAR and digits."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("grain")

from revjax import data, train  # noqa: E402
from revjax.data import grain_pipeline  # noqa: E402
from revjax.train import inputs  # noqa: E402


def _sharding(num_devices: int) -> NamedSharding:
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
    return NamedSharding(mesh, P("data"))


class _Draws:
    """Stands in for the numpy generator of the reference transforms: fixed offsets and flip."""

    def __init__(self, offset, flip: bool):
        self.offset, self.flip = np.asarray(offset), flip

    def integers(self, low, high, size=None):
        assert size == 2 and np.all((low <= self.offset) & (self.offset < high))
        return self.offset

    def random(self):
        return 0.0 if self.flip else 0.75  # the reference flips when random() < 0.5


@pytest.fixture(scope="module")
def cifar_like():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=40).astype(np.int32)
    mean = images.astype(np.float64).mean(axis=0).astype(np.float32)
    return images, labels, mean


def test_jitted_augmentation_equals_numpy_reference(cifar_like):
    images, _, mean = cifar_like
    spec = data.augment_spec("cifar10", augment=True)
    assert spec == data.AugmentSpec(pad=2, flip=True, subtract_mean=True, unit_range=False)
    offsets, flips = data.draw_augmentation(jax.random.key(1), len(images), spec)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    assert flips.any() and not flips.all() and len({tuple(o) for o in offsets}) > 10
    out = jax.jit(data.transform_batch, static_argnums=4)(images, mean, offsets, flips, spec)
    for i, image in enumerate(images):
        ref = data.cifar_train_transform(
            {"image": image, "label": 0}, _Draws(offsets[i], flips[i]), mean
        )
        np.testing.assert_array_equal(np.asarray(out[i]), ref["image"])  # bit for bit
    # Evaluation: mean subtraction only.
    out = data.transform_batch(images, mean, None, None, data.augment_spec("cifar10", False))
    for i in (0, 7):
        ref = data.cifar_eval_transform({"image": images[i], "label": 0}, mean)
        np.testing.assert_array_equal(np.asarray(out[i]), ref["image"])


def test_digits_device_transform_equals_grain_transform():
    source = data.DigitsSource("train")
    images, _ = data.load_split("digits", "train", image_size=12)  # resized once, on the host
    spec = data.augment_spec("digits", augment=True)
    offsets, flips = data.draw_augmentation(jax.random.key(2), 8, spec)
    out = np.asarray(data.transform_batch(images[:8], None, offsets, flips, spec))
    transform = grain_pipeline._TrainTransform("digits", True, 12, None)
    for i in range(8):
        ref = transform(source[i], _Draws(np.asarray(offsets[i]), False))
        np.testing.assert_array_equal(out[i], ref["image"])


def test_offsets_uniform_and_flips_half():
    spec = data.augment_spec("cifar10", augment=True)
    n = 20_000
    offsets, flips = data.draw_augmentation(jax.random.key(3), n, spec)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    # Pad 2 per side (32 -> 36): offsets 0..4 on each axis, each with probability 1/5.
    for axis in range(2):
        counts = np.bincount(offsets[:, axis], minlength=5)
        assert len(counts) == 5  # nothing outside 0..4
        chi2 = float(((counts - n / 5) ** 2 / (n / 5)).sum())
        assert chi2 < 18.5, counts  # chi-square, 4 degrees of freedom, p = 0.001
    assert abs(flips.mean() - 0.5) < 0.015  # 4 standard deviations
    # Rows and columns independent: all 25 windows appear, none far from 1/25.
    joint = np.bincount(offsets[:, 0] * 5 + offsets[:, 1], minlength=25)
    assert joint.min() > 0.8 * n / 25 and joint.max() < 1.2 * n / 25


def test_each_example_once_per_epoch_in_a_new_order():
    # 1497 = 3 * 499: one epoch is exactly three batches.
    inp = data.DeviceTrainInput("digits", batch_size=499, seed=3, batch_sharding=_sharding(1))
    assert inp.steps_per_epoch == 3
    batches = [inp.batch_at(k) for k in range(6)]
    source = data.DigitsSource("train")
    rows = lambda imgs, labels: sorted(  # noqa: E731
        (int(label), np.asarray(image).tobytes()) for image, label in zip(imgs, labels)
    )
    expected = rows(
        [source[i]["image"] * data.PIXEL_SCALE for i in range(len(source))],
        [source[i]["label"] for i in range(len(source))],
    )
    orders = []
    for epoch in (batches[:3], batches[3:]):
        images = np.concatenate([np.asarray(b["image"]) for b in epoch])
        labels = np.concatenate([np.asarray(b["label"]) for b in epoch])
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert rows(images, labels) == expected
        orders.append(labels)
    assert not np.array_equal(orders[0], orders[1])
    # The permutation itself.
    perms = [np.asarray(inp.permutation(e)) for e in (0, 1)]
    for perm in perms:
        np.testing.assert_array_equal(np.sort(perm), np.arange(1497))
    assert not np.array_equal(*perms)


def test_four_devices_equal_one(cifar_like):
    images, labels, mean = cifar_like
    kw = dict(batch_size=8, seed=5, arrays=(images, labels), mean=mean)
    one = data.DeviceTrainInput("cifar10", batch_sharding=_sharding(1), **kw)
    four = data.DeviceTrainInput("cifar10", batch_sharding=_sharding(4), **kw)
    for k in (0, 4, 5, 11):  # five steps per epoch: crosses two epochs
        a, b = one.batch_at(k), four.batch_at(k)
        assert len(b["image"].sharding.device_set) == 4
        assert len(b["image"].addressable_shards) == 4
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_device_eval_input_covers_the_split_once():
    evals = data.DeviceEvalInput("digits", batch_size=64, batch_sharding=_sharding(2))
    grain_batches = list(data.eval_iterator("digits", batch_size=64))
    device_batches = list(evals)
    assert len(device_batches) == len(grain_batches) == 5
    for d, g in zip(device_batches, grain_batches):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.asarray(d[key]), g[key])


def test_bad_arguments():
    with pytest.raises(ValueError, match="input_pipeline='grain'"):
        data.augment_spec("imagenet2012", True)
    with pytest.raises(ValueError, match="exceeds"):
        data.DeviceTrainInput("digits", batch_size=2000, seed=0, batch_sharding=_sharding(1))
    cfg = train.TrainConfig(dataset="imagenet2012", input_pipeline="device")
    with pytest.raises(ValueError, match="input_pipeline='grain'"):
        inputs.resolve_input_pipeline(cfg)
    with pytest.raises(ValueError, match="auto, device, grain"):
        inputs.resolve_input_pipeline(dataclasses.replace(cfg, input_pipeline="gpu"))
    assert inputs.resolve_input_pipeline(dataclasses.replace(cfg, input_pipeline="auto")) == "grain"
    assert data.fits_on_devices(10**15, [_FakeDevice(80 * 2**30)]) is False
    assert data.fits_on_devices(150 * 2**20, [_FakeDevice(80 * 2**30)]) is True


class _FakeDevice:
    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return {"bytes_limit": self.limit}


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------

TINY = train.TrainConfig(
    model="revnet_tiny", dataset="digits", batch_size=16, eval_batch_size=100, num_steps=4,
    lr_boundaries=(1000,), log_every=1, checkpoint_every=2, memory_report=False, num_devices=1,
)


def test_trainer_resume_through_grain_prefetch_is_bit_identical(tmp_path):
    # The device pipeline's resume is tests/test_train.py::test_resume_gives_identical_weights
    # (digits default to it); here the Grain path, whose prefetch thread reads ahead of the
    # checkpointed step.
    cfg = dataclasses.replace(TINY, input_pipeline="grain", prefetch=3)
    full = train.train_and_evaluate(cfg, tmp_path / "full")
    train.train_and_evaluate(dataclasses.replace(cfg, num_steps=2), tmp_path / "split")
    metadata = tmp_path / "split" / "checkpoints" / "2" / "data" / "metadata"
    assert json.loads(metadata.read_text())["input_pipeline"] == "grain"
    with pytest.warns(train.ConfigChangedWarning, match="num_steps 2 -> 4"):
        resumed = train.train_and_evaluate(cfg, tmp_path / "split")
    assert resumed["step"] == full["step"] == 4
    for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(full["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A checkpoint resumes only with the pipeline that wrote it.
    with pytest.raises(ValueError, match="input_pipeline='grain'"):
        train.train_and_evaluate(
            dataclasses.replace(cfg, input_pipeline="device", num_steps=6), tmp_path / "split"
        )


def test_trainer_picks_the_device_pipeline_for_digits_and_mock_cifar(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments.train import load_config

    mesh = train.make_mesh(1)
    digits = inputs.make_train_input(load_config("digits"), mesh, 8)
    assert digits.kind == "device" and digits.get_state() == {"input_pipeline": "device"}
    cifar = dataclasses.replace(load_config("cifar10_revnet38", quick=True), num_devices=1,
                                data_dir=str(tmp_path))
    assert cifar.input_pipeline == "auto"
    with tfds.testing.mock_data(num_examples=24):
        assert inputs.make_train_input(cifar, mesh, 32).kind == "device"
        # tests/test_train.py::test_trainer_on_mock_tfds trains this config end to end.
    imagenet = load_config("imagenet_revnet104", quick=True)
    assert inputs.resolve_input_pipeline(imagenet) == "grain"
