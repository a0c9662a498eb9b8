"""The paper's training recipe, shared by its table's rows (`experiments.configs.paper`) and the
digits config."""

from __future__ import annotations

import dataclasses

from revjax import presets
from revjax.train import TrainConfig

# The paper's CIFAR recipe (the RevNet authors' `resnet/configs/cifar_configs.py`): batch 100,
# SGD + momentum 0.9, lr 0.1, 0.01 from 40k and 0.001 from 60k steps, 80k steps, weight decay
# 2e-4 on conv and dense kernels.
CIFAR = dict(
    batch_size=100,
    eval_batch_size=500,
    num_steps=80_000,
    learning_rate=0.1,
    lr_boundaries=(40_000, 60_000),
    momentum=0.9,
    weight_decay=2e-4,
    log_every=100,
    eval_every=4_000,
    checkpoint_every=4_000,
)

# ImageNet, the RevNet authors' `resnet/configs/imagenet_configs.py`: batch 256, lr 0.1 set to
# 0.01 at 160k, 0.001 at 320k and 0.0001 at 480k steps (`lr_decay_steps`), 600k steps
# (`max_train_iter`), weight decay 1e-4.
IMAGENET = dict(
    batch_size=256,
    eval_batch_size=500,
    num_steps=600_000,
    learning_rate=0.1,
    lr_boundaries=(160_000, 320_000, 480_000),
    momentum=0.9,
    weight_decay=1e-4,
    log_every=500,
    eval_every=20_000,
    checkpoint_every=10_000,
    num_workers=8,
)

# A quick run, every config's smoke variant: two steps of batch 8, a checkpoint after each, no
# evaluation, memory report or worker processes (tests; mock data works).
QUICK_RUN = dict(
    batch_size=8,
    eval_batch_size=8,
    num_steps=2,
    log_every=1,
    eval_every=0,
    checkpoint_every=1,
    memory_report=False,
    num_workers=0,
)

# The paper recipe's quick variant (of a narrow network, `make_config`): the step decay at step 1.
QUICK = dict(QUICK_RUN, lr_boundaries=(1,))


def _quick_overrides(model: str, imagenet: bool) -> dict:
    units = (2, 2, 2, 2) if imagenet else (2, 2, 2)
    widths = (8, 8, 8, 16, 16) if imagenet else (8, 8, 16, 16)
    return {"units_per_stage": units, "widths": widths}


def make_config(model: str, dataset: str, quick: bool = False, **changes) -> TrainConfig:
    """The paper's recipe for ``model`` on ``dataset`` (``quick``: a tiny smoke-test variant)."""
    imagenet = dataset == "imagenet2012"
    recipe = dict(IMAGENET if imagenet else CIFAR)
    twin = presets.get(model).twin  # a RevNet's ResNet twin (similar parameter count)
    config = TrainConfig(model=model, twin_model=twin, dataset=dataset, **recipe)
    if quick:
        overrides = _quick_overrides(model, imagenet)
        config = dataclasses.replace(
            config,
            model_overrides=overrides,
            twin_overrides=overrides,
            image_size=32 if imagenet else None,
            **QUICK,
        )
    return dataclasses.replace(config, **changes)
