"""The paper-fidelity pins: every config's schedule is the RevNet authors' one, and ImageNet
evaluation is their central 87.5 % crop (renmengye/revnet-public, `resnet/configs/*.py` and
`resnet/data/image_processing.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.configs import paper
from experiments.train import CONFIG_DIR, ConfigError, describe, known_configs, load_config
from revjax import train

# The paper's configs: the rows of `experiments.configs.paper` (the transformer configs, AdamW +
# cosine, follow no RevNet schedule).
PAPER = [row.name for row in paper.ROWS]

# The authors' numbers: (batch, total steps, lr value per piece, boundaries, weight decay).
AUTHORS = {
    "cifar": (100, 80_000, (0.1, 0.01, 0.001), (40_000, 60_000), 2e-4),
    "imagenet": (256, 600_000, (0.1, 0.01, 0.001, 0.0001), (160_000, 320_000, 480_000), 1e-4),
}


def test_every_paper_row_is_a_config_and_pinned():
    assert len(PAPER) == len(set(PAPER)) == 14
    cifar_or_imagenet = {name for name in known_configs() if name.startswith(("cifar", "imagenet"))}
    assert cifar_or_imagenet - set(PAPER) == {"cifar10_vit", "cifar10_revvit"}
    # A file of a row's name would be shadowed by the row.
    assert not [n for n in PAPER if (CONFIG_DIR / f"{n}.py").exists()]
    assert {(row.model, row.dataset) for row in paper.ROWS} == {
        (m, d) for d in ("cifar10", "cifar100")
        for m in ("revnet38", "revnet110", "revnet164", "resnet32", "resnet110", "resnet164")
    } | {("revnet104", "imagenet2012"), ("resnet101", "imagenet2012")}


@pytest.mark.parametrize("name", PAPER)
def test_schedule_is_the_authors(name):
    config = load_config(name)
    assert (config.model, config.dataset) == (paper.BY_NAME[name].model,
                                              paper.BY_NAME[name].dataset)
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


@pytest.mark.parametrize("name", ["cifar100_resnet110", "imagenet_revnet104"])
def test_quick_variant_is_a_tiny_run_of_the_same_model(name):
    full, quick = load_config(name), load_config(name, quick=True)
    assert (quick.model, quick.twin_model, quick.dataset) == (full.model, full.twin_model,
                                                              full.dataset)
    assert quick.num_steps == 2 and quick.batch_size == 8
    assert quick.model_overrides["widths"][0] == 8
    assert quick.image_size == (32 if name.startswith("imagenet") else None)


def test_unknown_paper_name_suggests_the_closest_row():
    with pytest.raises(ConfigError, match=r"'cifar10_revnet39' \(did you mean 'cifar10_revnet38'"):
        load_config("cifar10_revnet39")
    with pytest.raises(ConfigError, match=r"did you mean 'imagenet_resnet101'"):
        describe("imagenet_resnet10")


@pytest.mark.parametrize("name", PAPER)
def test_describe_gives_target_time_and_commands(name):
    text, row = describe(name), paper.BY_NAME[name]
    assert text.startswith(f"{row.model} on {row.dataset}, the paper's recipe.\n")
    assert f"Target ({row.source}): {row.target}." in text
    assert f"Expected GPU time (an estimate, not measured here): {row.gpu_time}." in text
    assert f"python -m revjax.prepare {row.dataset} --data-dir" in text
    assert f"python -m experiments.train --config {name} " in text
    # The CIFAR mean image is over the training split only (the authors' averaged train + test).
    cifar = name.startswith("cifar")
    assert ("training\nsplit only" in text and "train and test" in text) == cifar
    assert ("--manual-dir" in text) == (not cifar)


def test_describe_a_config_file_prints_its_docstring():
    assert describe("digits").startswith("The default, offline job: RevNet-38")


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
