"""The paper-fidelity pins: every config's schedule is the RevNet authors' one, and ImageNet
evaluation is their central 87.5 % crop (renmengye/revnet-public, `resnet/configs/*.py` and
`resnet/data/image_processing.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from revjax import train

CONFIG_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"
# The paper's configs; the transformer ones (`*vit*`, AdamW + cosine) follow no RevNet schedule.
CONFIGS = sorted(
    p.stem
    for p in CONFIG_DIR.glob("*.py")
    if p.stem not in ("__init__", "common") and "vit" not in p.stem
)

# The authors' numbers: (batch, total steps, lr value per piece, boundaries, weight decay).
AUTHORS = {
    "cifar": (100, 80_000, (0.1, 0.01, 0.001), (40_000, 60_000), 2e-4),
    "imagenet": (256, 600_000, (0.1, 0.01, 0.001, 0.0001), (160_000, 320_000, 480_000), 1e-4),
}


def test_every_paper_config_is_pinned():
    assert {c for c in CONFIGS if c.startswith(("cifar", "imagenet"))} == set(CONFIGS) - {"digits"}
    assert len(CONFIGS) == 15


@pytest.mark.parametrize("name", [c for c in CONFIGS if c != "digits"])
def test_schedule_is_the_authors(name):
    from experiments.train import load_config

    config = load_config(name)
    family = "cifar" if name.startswith("cifar") else "imagenet"
    batch, steps, values, boundaries, weight_decay = AUTHORS[family]
    assert (config.batch_size, config.num_steps) == (batch, steps)
    assert tuple(config.lr_boundaries) == boundaries
    assert (config.momentum, config.weight_decay) == (0.9, weight_decay)
    lr = train.learning_rate_schedule(config)
    # The value on each piece: its first step, its last step.
    starts, ends = (0, *boundaries), (*(b - 1 for b in boundaries), steps - 1)
    for value, first, last in zip(values, starts, ends, strict=True):
        assert float(lr(first)) == pytest.approx(value, rel=1e-6), (name, first)
        assert float(lr(last)) == pytest.approx(value, rel=1e-6), (name, last)


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith("cifar")])
def test_cifar_docstrings_say_the_mean_is_over_train_only(name):
    import importlib

    doc = importlib.import_module(f"experiments.configs.{name}").__doc__
    assert "training\nsplit only" in doc and "train and test" in doc


def test_imagenet_eval_is_central_crop_then_resize():
    from revjax import data

    # 32x32: offset int((32 - 28) / 2) = 2, size 28; resizing 28 -> 28 is the identity, so the
    # output is exactly rows and columns 2..29, scaled to [-1, 1].
    image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3) % 251
    image = image.astype(np.uint8)
    out = data.imagenet_eval_transform({"image": image, "label": 7}, image_size=28)
    # Scaled as the transform scales (uint8 * float32(1/255), then to [-1, 1]).
    expected = image[2:30, 2:30].astype(np.float32) * data.transforms.PIXEL_SCALE * 2.0 - 1.0
    np.testing.assert_array_equal(out["image"], expected)
    assert out["label"] == 7 and out["label"].dtype == np.int32

    # 16x40, rows constant: rows offset int((16 - 14) / 2) = 1, size 14; columns offset
    # int((40 - 35) / 2) = 2, size 36. Resized to 14x14 (the width squashed 36 -> 14, the aspect
    # ratio not kept): each output row is input row 1 + i, whatever the column filter does.
    rows = np.array([10 * r for r in range(16)], np.uint8)
    image = np.broadcast_to(rows[:, None, None], (16, 40, 3)).copy()
    out = data.imagenet_eval_transform({"image": image, "label": 0}, image_size=14)
    expected = (rows[1:15].astype(np.float32) / 255.0 * 2.0 - 1.0)[:, None, None]
    np.testing.assert_allclose(out["image"], np.broadcast_to(expected, (14, 14, 3)), atol=1e-6)
