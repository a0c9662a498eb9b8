"""The ImageNet input: reduced-scale decoding on the host, augmentation in the compiled step.

The device augmentation equals its numpy reference bit for bit; reduced-scale decoding crops
the same region as a full-size decode; the crop sampler has the authors' distribution; the
host path resumes exactly and gives the same batches on 4 devices as on 1.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("grain")

from revjax.data import imagenet, imagenet_decode, transforms  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """Photo-like content: upsampled noise (what JPEG and downscaling are made for)."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class JpegSource:
    """Random-access `{"image": JPEG bytes, "label"}`, as `make_source(..., encoded=True)`."""

    def __init__(self, jpegs, labels):
        self.jpegs, self.labels = jpegs, labels

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        return {"image": self.jpegs[i], "label": int(self.labels[i])}


@pytest.fixture(scope="module")
def jpegs():
    sizes = [(60, 80), (48, 64), (64, 48), (50, 75)] * 4
    return [_jpeg(_smooth_image(h, w, i)) for i, (h, w) in enumerate(sizes)]


DECODERS = ["pil"] + (["simplejpeg"] if imagenet_decode.simplejpeg_module() is not None else [])


# ------------------------------------------------------------------------------------------
# Device augmentation vs the numpy reference
# ------------------------------------------------------------------------------------------


def test_device_augmentation_equals_numpy_reference_bit_for_bit():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 20, 20, 3), dtype=np.uint8)
    images[0] = 128  # grey: hue undefined
    images[1, ..., 1] = images[1, ..., 0]  # ties between channels
    images[2, :10] = 255  # saturated
    draws = imagenet.draw_jitter(jax.random.key(3), 8)
    fn = jax.jit(imagenet.augment_batch, static_argnums=2)
    d = jax.tree.map(np.asarray, draws)
    assert d.flip.any() and not d.flip.all()
    assert d.saturation_first.any() and not d.saturation_first.all()
    for jitter in (True, False):
        out = np.asarray(fn(images, draws, jitter))
        ref = np.stack([
            transforms.imagenet_augment_reference(
                images[i], bool(d.flip[i]), d.brightness[i], d.saturation[i], d.hue[i],
                d.contrast[i], bool(d.saturation_first[i]), jitter,
            )
            for i in range(8)
        ])
        assert out.dtype == ref.dtype == np.float32
        np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
        assert out.min() >= -1 and out.max() <= 1


def test_jitter_draws_cover_the_authors_ranges():
    d = jax.tree.map(np.asarray, imagenet.draw_jitter(jax.random.key(0), 4000))
    for values, (low, high) in (
        (d.brightness, (-32 / 255, 32 / 255)),
        (d.saturation, transforms.IMAGENET_SATURATION_RANGE),
        (d.hue, (-0.2, 0.2)),
        (d.contrast, transforms.IMAGENET_CONTRAST_RANGE),
    ):
        assert low <= values.min() < low + 0.01 * (high - low)
        assert high - 0.01 * (high - low) < values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.03 * (high - low)
    assert 0.45 < d.flip.mean() < 0.55 and 0.45 < d.saturation_first.mean() < 0.55


# ------------------------------------------------------------------------------------------
# Reduced-scale decoding
# ------------------------------------------------------------------------------------------


def test_reduction_choice():
    assert imagenet.reduction_for(500, 375, 224) == 1
    assert imagenet.reduction_for(480, 460, 224) == 2
    assert imagenet.reduction_for(1000, 900, 224) == 4
    assert imagenet.reduction_for(4000, 3000, 224) == 8
    assert imagenet.reduction_for(4000, 3000, 224, max_reduction=2) == 2
    assert imagenet.reduction_for(10, 10, 224) == 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_reduced_decoding_crops_the_same_region(decoder):
    # A 256x192 photo with a bright marker; crops decoded at 1/2, 1/4, 1/8 against 1/1.
    image = _smooth_image(192, 256, 7) // 2
    image[100:116, 150:166] = 255  # the marker, 16x16 at (100, 150)
    jpeg = _jpeg(image)
    size = 16
    box = (40, 88, 128, 136)  # top, left, h, w: 128 >= 8 * 16 allows every reduction
    full = imagenet.decode_crop(jpeg, box, size, reduction=1, decoder=decoder)

    def marker_centre(out):
        weight = np.clip(out.astype(np.float64).mean(-1) - 160, 0, None)
        ys, xs = np.mgrid[: out.shape[0], : out.shape[1]]
        return np.array([(weight * ys).sum(), (weight * xs).sum()]) / weight.sum()

    # Where the marker's centre lands in the output: (108 - 40) / 128 * 16 - 0.5 etc.
    expected = np.array([(108 - 40) / 128 * size - 0.5, (158 - 88) / 136 * size - 0.5])
    np.testing.assert_allclose(marker_centre(full), expected, atol=0.25)
    for d in (2, 4, 8):
        out = imagenet.decode_crop(jpeg, box, size, reduction=d, decoder=decoder)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        np.testing.assert_allclose(marker_centre(out), marker_centre(full), atol=0.25)
        # The stated bound: >= 35 dB from the full-size decode at every reduction (seen: 40-57).
        assert _psnr(out, full) >= 35.0, (d, _psnr(out, full))


@pytest.mark.parametrize("decoder", DECODERS)
def test_full_size_host_crop_equals_the_reference_crop(decoder, jpegs):
    # max_reduction=1: the same box as the authors' sampler with the same generator, and the
    # same pixels up to PIL sampling the neighbours of the box at its border.
    from PIL import Image

    for i, jpeg in enumerate(jpegs[:4]):
        out = imagenet.ImageNetTrainCrop(24, 1, decoder)(
            {"image": jpeg, "label": i}, np.random.default_rng(i)
        )
        decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        top, left, h, w = transforms.random_crop_box(*decoded.shape[:2], np.random.default_rng(i))
        reference = transforms._resize(decoded[top : top + h, left : left + w], 24, 24)
        assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.uint8
        assert out["label"] == i
        assert _psnr(out["image"], reference) >= 35.0


def test_eval_crop_is_the_central_crop(jpegs):
    from PIL import Image

    jpeg = jpegs[0]
    out = imagenet.ImageNetEvalCrop(24)({"image": jpeg, "label": 3})
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    ref = transforms.imagenet_eval_transform({"image": decoded, "label": 3}, 24)["image"]
    unit = np.asarray(imagenet.to_unit_range(out["image"][None]))[0]
    assert out["mask"] == 1.0
    assert np.abs(unit - ref).mean() < 0.02


def test_eval_batches_take_every_example_once_padded_with_uint8_zeros(jpegs):
    source = JpegSource(jpegs[:5], range(5))
    seen = []
    for process in range(2):
        ds = imagenet.eval_dataset(batch_size=4, image_size=16, source=source,
                                   process_index=process, process_count=2)
        batches = list(ds)
        assert len(batches) == 2  # 5 examples -> 8 rows (3 of padding), 2 per process per batch
        for batch in batches:
            assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 16, 16, 3)
            pad = batch["mask"] == 0
            assert not batch["image"][pad].any() and not batch["label"][pad].any()
            seen += batch["label"][~pad].tolist()
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_crop_statistics_match_the_authors_sampler():
    # The host path's sampler against an independent transcription of
    # tf.image.sample_distorted_bounding_box's rule (area and aspect uniform, rejection).
    height, width, n = 375, 500, 20000
    ours = np.array([transforms.random_crop_box(height, width, np.random.default_rng(s))
                     for s in range(n)])
    rng = np.random.default_rng(10**6)
    theirs = []
    while len(theirs) < n:
        area = rng.uniform(0.05, 1.0) * height * width
        aspect = rng.uniform(3 / 4, 4 / 3)
        h, w = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
        if h <= height and w <= width:
            theirs.append((h, w))
    theirs = np.array(theirs)
    for boxes in (ours[:, 2:], theirs):
        frac = boxes[:, 0] * boxes[:, 1] / (height * width)
        aspect = boxes[:, 1] / boxes[:, 0]
        assert frac.min() >= 0.049 and frac.max() <= 1.0
        assert aspect.min() >= 0.74 and aspect.max() <= 1.35
    # Same distributions: quantiles of area fraction and aspect within sampling noise.
    q = np.linspace(0.05, 0.95, 10)
    for f in (lambda b: b[:, 0] * b[:, 1], lambda b: b[:, 1] / b[:, 0]):
        a, b = np.quantile(f(ours[:, 2:]), q), np.quantile(f(theirs), q)
        np.testing.assert_allclose(a, b, rtol=0.03)
    # Boxes lie inside the image.
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()


# ------------------------------------------------------------------------------------------
# The host stream: uint8, resumable, independent of the device count
# ------------------------------------------------------------------------------------------


def _sharding(num_devices: int) -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(jax.devices()[:num_devices]), ("data",)), P("data"))


def _input(jpegs, num_devices, seed=1):
    source = JpegSource(jpegs, np.arange(len(jpegs)) % 5)
    it = imagenet.train_iterator(batch_size=4, seed=seed, image_size=16, source=source,
                                 num_threads=2)
    return imagenet.ImageNetTrainInput(it, _sharding(num_devices), seed=seed)


def test_host_stream_ships_uint8_and_resumes_exactly(jpegs):
    inp = _input(jpegs, 1)
    first = [jax.tree.map(np.asarray, inp.step_args(k)[0]) for k in range(3)]
    assert first[0]["image"].dtype == np.uint8 and first[0]["image"].shape == (4, 16, 16, 3)
    state = inp.get_state()
    after = [jax.tree.map(np.asarray, inp.step_args(k)[0]) for k in range(3, 7)]  # epoch 2
    inp.close()
    resumed = _input(jpegs, 1)
    resumed.set_state(state)
    again = [jax.tree.map(np.asarray, resumed.step_args(k)[0]) for k in range(3, 7)]
    augmented = np.asarray(resumed.batch_at(6)["image"])
    resumed.close()
    for a, b in zip(after, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert augmented.dtype == np.float32 and -1 <= augmented.min() and augmented.max() <= 1


def test_four_devices_equal_one(jpegs):
    assert len(jax.devices()) >= 4  # tests/conftest.py forces 8 CPU devices
    one, four = _input(jpegs, 1), _input(jpegs, 4)
    try:
        for k in range(3):
            a, b = one.step_args(k)[0], four.step_args(k)[0]
            assert len(b["image"].sharding.device_set) == 4
            np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
            xa, xb = one.batch_at(k)["image"], four.batch_at(k)["image"]
            assert len(xb.sharding.device_set) == 4
            np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
    finally:
        one.close()
        four.close()


# ------------------------------------------------------------------------------------------
# DALI (CPU-only mode here; the GPU run is in experiments/gpu_check.py)
# ------------------------------------------------------------------------------------------


def _dali_input(jpegs, num_devices):
    from revjax.data import dali_pipeline

    source = JpegSource(jpegs, np.arange(len(jpegs)) % 5)
    return dali_pipeline.DaliTrainInput(batch_size=4, seed=1, batch_sharding=_sharding(num_devices),
                                        image_size=16, source=source, num_threads=1)


def test_dali_crops_match_the_host_path_and_resume(jpegs):
    pytest.importorskip("nvidia.dali")
    one, four = _dali_input(jpegs, 1), _dali_input(jpegs, 4)
    host = imagenet.train_iterator(batch_size=4, seed=1, image_size=16, num_threads=1,
                                   source=JpegSource(jpegs, np.arange(len(jpegs)) % 5))
    try:
        for k in range(2):
            a, b, h = one.step_args(k)[0], four.step_args(k)[0], next(host)
            x = np.asarray(a["image"])
            assert x.dtype == np.uint8 and x.shape == (4, 16, 16, 3)
            assert len(b["image"].sharding.device_set) == 4
            np.testing.assert_array_equal(x, np.asarray(b["image"]))
            np.testing.assert_array_equal(np.asarray(a["label"]), h["label"])
            # Same boxes as the host path; another decoder and resize kernel: >= 35 dB.
            assert min(_psnr(x[i], h["image"][i]) for i in range(4)) >= 35.0
        state = one.get_state()
        assert state["input_pipeline"] == "dali"
        expected = np.asarray(one.step_args(2)[0]["image"])
        resumed = _dali_input(jpegs, 1)
        resumed.set_state(state)
        np.testing.assert_array_equal(np.asarray(resumed.step_args(2)[0]["image"]), expected)
        resumed.close()
        with pytest.raises(ValueError, match="input_pipeline='grain'"):
            _dali_input(jpegs, 1).set_state({"input_pipeline": "grain", "iterator": {}})
    finally:
        one.close()
        four.close()


def test_dali_missing_says_how_to_install(monkeypatch):
    from revjax.data import dali_pipeline

    monkeypatch.setattr(dali_pipeline, "_import_dali", lambda: None)
    with pytest.raises(ImportError, match=r"pip install 'revjax\[dali\]'"):
        dali_pipeline.require_dali()
    assert not dali_pipeline.dali_available()


# ------------------------------------------------------------------------------------------
# A fabricated ILSVRC2012 archive, prepared offline, pre-sized
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_imagenet(tmp_path_factory):
    """Fabricated ILSVRC2012 tars -> `python -m revjax.prepare imagenet2012 --max-side 48`
    (needs TensorFlow, in its own process as users run it)."""
    pytest.importorskip("tensorflow")
    from data_utils import write_imagenet_manual

    root = tmp_path_factory.mktemp("imagenet")
    counts = write_imagenet_manual(str(root / "manual"), num_classes=3, per_class=4, num_val=6)
    data_dir = root / "tfds"
    proc = subprocess.run(
        [sys.executable, "-m", "revjax.prepare", "imagenet2012", "--data_dir", str(data_dir),
         "--manual_dir", str(root / "manual"), "--max-side", "48"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"data_dir": data_dir, "presized": data_dir / "max_side_48", "stdout": proc.stdout,
            **counts}


@pytest.mark.slow
def test_prepare_presizes_the_training_split(prepared_imagenet):
    info = prepared_imagenet
    assert "longest side <= 48" in info["stdout"] and "x)" in info["stdout"]
    full = imagenet.encoded_source("train", info["data_dir"])
    small = imagenet.encoded_source("train", info["presized"])
    assert len(full) == len(small) == info["train"]
    for i in range(len(full)):
        (h, w), (hs, ws) = imagenet.jpeg_size(full[i]["image"]), imagenet.jpeg_size(
            small[i]["image"])
        assert max(hs, ws) == 48 and abs(hs / ws - h / w) < 0.05
        assert int(small[i]["label"]) == int(full[i]["label"])
        assert len(small[i]["image"]) < len(full[i]["image"])
    # The validation split is the original one.
    val = imagenet.encoded_source("validation", info["presized"])
    assert len(val) == info["validation"]
    assert val[0]["image"] == imagenet.encoded_source("validation", info["data_dir"])[0]["image"]
    with pytest.raises(SystemExit):
        from revjax.data import prepare

        prepare.main(["cifar10", "--data_dir", str(info["data_dir"]), "--max-side", "48"])


@pytest.mark.slow
def test_trainer_on_the_prepared_archive_resumes_bit_identically(prepared_imagenet, tmp_path):
    # The real chain: fabricated ILSVRC2012 tars -> prepare --max-side -> the trainer's
    # ImageNet host path (auto on CPU) -> a checkpoint -> resume: the same weights.
    import dataclasses
    import json

    from revjax import train
    from revjax.train import inputs

    cfg = train.TrainConfig(
        model="revnet_tiny", dataset="imagenet2012", image_size=16, batch_size=4,
        eval_batch_size=4, num_steps=3, lr_boundaries=(1000,), log_every=1, checkpoint_every=2,
        memory_report=False, num_devices=1, data_dir=str(prepared_imagenet["presized"]),
    )
    assert inputs.resolve_input_pipeline(cfg) == "grain"
    inp = inputs.make_train_input(cfg, train.make_mesh(1), 16)
    assert isinstance(inp, imagenet.ImageNetTrainInput)
    batch = inp.step_args(0)[0]
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 16, 16, 3)
    inp.close()
    full = train.train_and_evaluate(cfg, tmp_path / "full")
    train.train_and_evaluate(dataclasses.replace(cfg, num_steps=2), tmp_path / "split")
    metadata = tmp_path / "split" / "checkpoints" / "2" / "data" / "metadata"
    assert json.loads(metadata.read_text())["input_pipeline"] == "grain"
    with pytest.warns(train.ConfigChangedWarning, match=r"num_steps 2 -> 3"):
        resumed = train.train_and_evaluate(cfg, tmp_path / "split")  # step 3: the next epoch
    assert resumed["step"] == full["step"] == 3
    for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(full["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(full["train_loss"]) and 0.0 <= full["eval_accuracy"] <= 1.0


def test_trainer_pipeline_names_for_imagenet(monkeypatch):
    import dataclasses

    from experiments.train import load_config
    from revjax.data import dali_pipeline
    from revjax.train import inputs

    cfg = load_config("imagenet_revnet104", quick=True)
    assert inputs.resolve_input_pipeline(cfg) == "grain"  # auto on a CPU
    with pytest.raises(ValueError, match="cannot read imagenet2012"):
        inputs.resolve_input_pipeline(dataclasses.replace(cfg, input_pipeline="device"))
    with pytest.raises(ValueError, match="imagenet2012 only"):
        inputs.resolve_input_pipeline(load_config("digits").__class__(
            dataset="digits", input_pipeline="dali"))
    monkeypatch.setattr(dali_pipeline, "_import_dali", lambda: None)
    with pytest.raises(ImportError, match=r"revjax\[dali\]"):
        inputs.resolve_input_pipeline(dataclasses.replace(cfg, input_pipeline="dali"))
