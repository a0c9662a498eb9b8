"""Tests of the input pipelines: digits offline, TFDS mock data, missing data, prepare -> read."""

import colorsys
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")

from revjax import data  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(images, labels):
    """Order-free view of a set of examples: sorted (label, image bytes) pairs."""
    return sorted((int(label), np.asarray(image).tobytes()) for image, label in zip(images, labels))


def _concat(batches, key):
    return np.concatenate([b[key] for b in batches])


# ------------------------------------------------------------------------------------------
# Names, info, argument errors
# ------------------------------------------------------------------------------------------


def test_dataset_info():
    assert set(data.KNOWN_DATASETS) == {"cifar10", "cifar100", "imagenet2012", "digits"}
    info = data.get_dataset_info("cifar100")
    assert (info.num_classes, info.image_shape, info.train_split, info.eval_split) == (
        100,
        (32, 32, 3),
        "train",
        "test",
    )
    assert data.get_dataset_info("imagenet2012", image_size=64).image_shape == (64, 64, 3)
    digits = data.get_dataset_info("digits")
    assert (digits.num_train, digits.num_eval, digits.image_shape) == (1497, 300, (8, 8, 1))
    assert data.get_dataset_info("digits", image_size=16).image_shape == (16, 16, 1)
    assert digits.steps_per_epoch(100) == 14
    with pytest.raises(ValueError, match="32x32"):
        data.get_dataset_info("cifar10", image_size=64)


def test_unknown_dataset_lists_known_names():
    for call in (
        lambda: data.get_dataset_info("mnist"),
        lambda: data.train_iterator("mnist", batch_size=8, seed=0),
        lambda: data.eval_iterator("mnist", batch_size=8),
    ):
        with pytest.raises(ValueError, match="mnist") as e:
            call()
        for name in data.KNOWN_DATASETS:
            assert name in str(e.value)


def test_bad_batching_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        data.train_iterator("digits", batch_size=10, seed=0, process_count=3)
    with pytest.raises(ValueError, match="not divisible"):
        data.eval_iterator("digits", batch_size=10, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.train_iterator("digits", batch_size=10, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="exceeds"):
        data.train_iterator("digits", batch_size=2000, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.train_iterator("digits", batch_size=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        data.train_iterator("digits", batch_size=8, seed=-1)


# ------------------------------------------------------------------------------------------
# digits (embedded, offline)
# ------------------------------------------------------------------------------------------


def test_digits_source_splits_cover_the_dataset_once():
    from sklearn.datasets import load_digits

    train, test = data.DigitsSource("train"), data.DigitsSource("test")
    assert (len(train), len(test)) == (1497, 300)
    example = train[0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
    assert isinstance(example["label"], int)
    raw = load_digits()
    expected = np.rint(raw.images * 255 / 16).astype(np.uint8)[..., None]
    both = [s[i] for s in (train, test) for i in range(len(s))]
    assert _rows([e["image"] for e in both], [e["label"] for e in both]) == _rows(
        expected, raw.target
    )
    with pytest.raises(ValueError, match="train"):
        data.DigitsSource("validation")


def test_digits_arrays_select_and_renumber_classes():
    source = data.DigitsSource("test")
    x, y = data.digits_arrays("test", range(5, 10))
    kept = [i for i in range(len(source)) if source[i]["label"] >= 5]
    assert x.shape == (len(kept), 8, 8, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert [int(v) for v in y] == [source[i]["label"] - 5 for i in kept]
    np.testing.assert_array_equal(x[0], source[kept[0]]["image"] / np.float32(255))
    x_all, y_all = data.digits_arrays("test")
    assert len(y_all) == len(source) and set(y_all.tolist()) == set(range(10))


def test_digits_train_epochs_are_permutations():
    # 1497 = 3 * 499: one epoch is exactly three batches.
    it = data.train_iterator("digits", batch_size=499, seed=3, num_threads=1)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        assert b["image"].shape == (499, 8, 8, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (499,) and b["label"].dtype == np.int32
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    source = data.DigitsSource("train")
    expected = _rows(
        [source[i]["image"] * data.PIXEL_SCALE for i in range(len(source))],
        [source[i]["label"] for i in range(len(source))],
    )
    for epoch in (batches[:3], batches[3:]):
        assert _rows(_concat(epoch, "image"), _concat(epoch, "label")) == expected
    # Reshuffled per epoch.
    assert not np.array_equal(batches[0]["label"], batches[3]["label"])


def test_digits_same_seed_same_batches():
    def first(seed, **kw):
        it = data.train_iterator("digits", batch_size=64, seed=seed, augment=True, **kw)
        return [next(it) for _ in range(3)]

    a, b, c = first(0), first(0, num_threads=0), first(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_digits_iterator_resumes_exactly_across_epochs():
    kw = dict(batch_size=128, seed=7, augment=True)  # 11 batches per epoch
    it = data.train_iterator("digits", **kw)
    for _ in range(9):
        next(it)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # what a checkpoint stores
    expected = [next(it) for _ in range(5)]  # crosses into the second epoch

    fresh = data.train_iterator("digits", **kw)
    next(fresh)  # a position that set_state must override
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_digits_processes_split_each_global_batch():
    kw = dict(batch_size=100, seed=5, augment=True)
    single = data.train_iterator("digits", **kw)
    shards = [
        data.train_iterator("digits", process_index=p, process_count=2, **kw) for p in range(2)
    ]
    for _ in range(3):
        whole = next(single)
        parts = [next(s) for s in shards]
        assert all(p["image"].shape == (50, 8, 8, 1) for p in parts)
        assert _rows(_concat(parts, "image"), _concat(parts, "label")) == _rows(
            whole["image"], whole["label"]
        )


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
    kw = dict(batch_size=100, seed=0, augment=True)
    reference = data.train_iterator("digits", **kw)
    expected = [next(reference) for _ in range(4)]
    it = data.train_iterator("digits", num_workers=2, **kw)
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    got.append(next(it))
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g["image"], e["image"])
    # The state of a worker-backed iterator restores into one built with the same num_workers.
    resumed = data.train_iterator("digits", num_workers=2, **kw)
    resumed.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(resumed)["image"], expected[3]["image"])
    it.close()
    resumed.close()


@pytest.mark.parametrize("process_count", [1, 2])
def test_digits_eval_mask_covers_the_split_once(process_count):
    source = data.DigitsSource("test")
    per_process = [
        list(
            data.eval_iterator(
                "digits", batch_size=64, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    assert {len(batches) for batches in per_process} == {5}  # ceil(300 / 64)
    batches = [b for bs in per_process for b in bs]
    mask = _concat(batches, "mask")
    assert mask.dtype == np.float32 and mask.sum() == 300
    real = mask == 1
    images, labels = _concat(batches, "image"), _concat(batches, "label")
    assert not images[~real].any()
    assert _rows(images[real], labels[real]) == _rows(
        [source[i]["image"] * data.PIXEL_SCALE for i in range(300)],
        [source[i]["label"] for i in range(300)],
    )
    if process_count == 1:  # in order
        np.testing.assert_array_equal(labels[real], [source[i]["label"] for i in range(300)])


def test_digits_image_size_option():
    batch = next(data.train_iterator("digits", batch_size=16, seed=0, image_size=16))
    assert batch["image"].shape == (16, 16, 16, 1)
    batch = next(data.eval_iterator("digits", batch_size=16, image_size=16))
    assert batch["image"].shape == (16, 16, 16, 1)


# ------------------------------------------------------------------------------------------
# Per-example transforms
# ------------------------------------------------------------------------------------------


def test_cifar_crop_is_a_window_of_the_padded_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, size=(32, 32, 3)).astype(np.float32)
    padded = np.pad(image - mean, ((2, 2), (2, 2), (0, 0)))
    windows = {}
    for top in range(5):
        for left in range(5):
            window = padded[top : top + 32, left : left + 32]
            windows[window.tobytes()] = (top, left, False)
            windows[window[:, ::-1].tobytes()] = (top, left, True)
    seen = set()
    for seed in range(300):
        out = data.cifar_train_transform(
            {"image": image, "label": 3}, np.random.default_rng(seed), mean
        )
        assert out["image"].dtype == np.float32 and out["image"].shape == (32, 32, 3)
        assert out["label"] == 3 and out["label"].dtype == np.int32
        seen.add(windows[out["image"].tobytes()])  # KeyError if not a padded window
    assert len(seen) > 40  # of the 50 crops and flips, most appear
    assert {s[0] for s in seen} == set(range(5)) and {s[2] for s in seen} == {False, True}


def test_hsv_conversion_matches_colorsys():
    rgb = np.random.default_rng(0).uniform(size=(6, 7, 3)).astype(np.float32)
    rgb[0, 0] = [0.5, 0.5, 0.5]  # grey: undefined hue
    rgb[1, 1] = [0.0, 0.0, 0.0]
    planar = rgb.transpose(2, 0, 1)
    hsv = data.transforms._rgb_to_hsv(planar)
    for y in range(6):
        for x in range(7):
            np.testing.assert_allclose(hsv[:, y, x], colorsys.rgb_to_hsv(*rgb[y, x]), atol=1e-6)
    np.testing.assert_allclose(data.transforms._hsv_to_rgb(hsv), planar, atol=1e-6)
    # Saturation x1 and hue +0 leave the image unchanged.
    unchanged = data.transforms._adjust_saturation_and_hue(planar, 1.0, 0.0)
    np.testing.assert_allclose(unchanged, planar, atol=1e-6)


def test_imagenet_transforms_on_odd_sizes():
    rng = np.random.default_rng(0)
    for h, w in [(10, 25), (300, 200), (1, 7), (64, 64)]:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        for seed in range(5):
            out = data.imagenet_train_transform(
                {"image": image, "label": 1}, np.random.default_rng(seed), image_size=24
            )
            assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.float32
            assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
        out = data.imagenet_eval_transform({"image": image, "label": 1}, image_size=24)
        assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.float32
    # Eval is a central crop: a constant image stays constant, scaled to [-1, 1].
    flat = np.full((40, 90, 3), 255, np.uint8)
    np.testing.assert_allclose(
        data.imagenet_eval_transform({"image": flat, "label": 0}, 32)["image"], 1.0
    )
    for _ in range(100):
        top, left, ch, cw = data.transforms.random_crop_box(50, 80, rng)
        assert 0 <= top and top + ch <= 50 and 0 <= left and left + cw <= 80
        assert ch * cw >= 0.04 * 50 * 80  # area >= 5%, less rounding


# ------------------------------------------------------------------------------------------
# TFDS mock data (no network, no TensorFlow)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_mock_pipeline(name, tmp_path):
    num_classes = data.get_dataset_info(name).num_classes
    with tfds.testing.mock_data(num_examples=24):
        train = data.make_source(name, "train", tmp_path)
        raw = np.stack([train[i]["image"] for i in range(len(train))])
        mean = data.mean_image(name, tmp_path)
        np.testing.assert_allclose(mean, raw.mean(axis=0), rtol=1e-6)

        batch = next(data.train_iterator(name, batch_size=8, seed=0, data_dir=tmp_path))
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert ((0 <= batch["label"]) & (batch["label"] < num_classes)).all()
        # Mean-subtracted, 0..255 units (padding is 0 = the mean colour).
        assert (batch["image"] >= -255).all() and (batch["image"] <= 255).all()

        test = data.make_source(name, "test", tmp_path)
        batches = list(data.eval_iterator(name, batch_size=10, data_dir=tmp_path))
    assert len(batches) == 3
    np.testing.assert_array_equal([b["mask"].sum() for b in batches], [10, 10, 4])
    images = _concat(batches, "image")[:24]
    np.testing.assert_allclose(images + mean, [test[i]["image"] for i in range(24)], atol=1e-4)
    np.testing.assert_array_equal(
        _concat(batches, "label")[:24], [int(test[i]["label"]) for i in range(24)]
    )


def test_imagenet_mock_pipeline(tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        it = data.train_iterator(
            "imagenet2012", batch_size=4, seed=0, data_dir=tmp_path, image_size=32
        )
        batches = [next(it) for _ in range(3)]
        state = it.get_state()
        more = next(it)
        it.set_state(state)
        np.testing.assert_array_equal(next(it)["image"], more["image"])
        evals = list(
            data.eval_iterator(
                "imagenet2012",
                batch_size=4,
                data_dir=tmp_path,
                image_size=32,
                process_index=1,
                process_count=2,
            )
        )
    with pytest.raises(ValueError, match="no mean image"):
        data.mean_image("imagenet2012", tmp_path)
    for b in batches:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert -1 <= b["image"].min() and b["image"].max() <= 1
        assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
    assert len(evals) == 3 and evals[0]["image"].shape == (2, 32, 32, 3)
    assert sum(b["mask"].sum() for b in evals) == 5  # this process's half of the 10


def test_read_path_does_not_import_tensorflow(tmp_path):
    where = f"data_dir={str(tmp_path)!r}"
    code = (
        "import sys, tensorflow_datasets as tfds\n"
        "from revjax import data\n"
        "with tfds.testing.mock_data(num_examples=4):\n"
        f"    next(data.train_iterator('cifar10', batch_size=2, seed=0, {where}))\n"
        f"    list(data.eval_iterator('cifar10', batch_size=2, {where}))\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# Missing data, prepare
# ------------------------------------------------------------------------------------------


def test_missing_data_names_the_prepare_command(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.train_iterator("cifar10", batch_size=8, seed=0, data_dir=tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    message = str(e.value)
    assert f"python -m revjax.prepare cifar10 --data_dir {tmp_path}" in message
    assert "pip install 'revjax[prepare]'" in message

    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.eval_iterator("imagenet2012", batch_size=8, data_dir=tmp_path)
    message = str(e.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert "python -m revjax.prepare imagenet2012 --data_dir" in message
    assert not any(tmp_path.iterdir())  # reading created nothing


def test_prepare_argument_errors(tmp_path):
    from revjax.data import prepare

    with pytest.raises(ValueError, match="needs no preparation"):
        prepare.prepare("digits", tmp_path)
    with pytest.raises(ValueError, match="Unknown dataset"):
        prepare.prepare("mnist", tmp_path)
    # Checked before TensorFlow is needed.
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
        prepare.prepare("imagenet2012", tmp_path, manual_dir=tmp_path)
    assert prepare.main(["imagenet2012", "--data_dir", str(tmp_path)]) == 1
    with pytest.raises(SystemExit):
        prepare.main(["digits", "--data_dir", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="preparing TFDS data needs TensorFlow: pip install 'revjax[prepare]'",
)
def test_prepare_then_read_cifar_offline(tmp_path):
    from data_utils import make_cifar_examples, write_cifar_download

    data_dir, download_dir = tmp_path / "data", tmp_path / "downloads"
    examples = {}
    for i, name in enumerate(["cifar10", "cifar100"]):
        examples[name] = make_cifar_examples(name, num_train=12, num_test=5, seed=i)
        write_cifar_download(name, str(download_dir), examples[name])
    # The real command, in its own process (TensorFlow stays out of this one).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "revjax.prepare",
            "cifar10",
            "cifar100",
            "--data_dir",
            str(data_dir),
            "--download_dir",
            str(download_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    for name in ("cifar10", "cifar100"):
        (train_labels, train_images), (test_labels, test_images) = (
            examples[name]["train"],
            examples[name]["test"],
        )
        source = data.make_source(name, "train", data_dir)
        assert _rows(
            [source[i]["image"] for i in range(12)], [source[i]["label"] for i in range(12)]
        ) == _rows(train_images, train_labels)
        mean = data.mean_image(name, data_dir)
        np.testing.assert_allclose(mean, train_images.mean(axis=0), rtol=1e-6)
        assert (data_dir / name / "3.0.2" / "revjax_mean_image_train.npy").is_file()

        batches = list(data.eval_iterator(name, batch_size=4, data_dir=data_dir))
        mask = _concat(batches, "mask") == 1
        assert mask.sum() == 5
        restored = np.rint(_concat(batches, "image")[mask] + mean).astype(np.uint8)
        assert _rows(restored, _concat(batches, "label")[mask]) == _rows(test_images, test_labels)

        it = data.train_iterator(name, batch_size=4, seed=0, data_dir=data_dir, augment=False)
        epoch = [next(it) for _ in range(3)]
        restored = np.rint(_concat(epoch, "image") + mean).astype(np.uint8)
        assert _rows(restored, _concat(epoch, "label")) == _rows(train_images, train_labels)
        augmented = next(data.train_iterator(name, batch_size=4, seed=0, data_dir=data_dir))
        assert augmented["image"].shape == (4, 32, 32, 3)
