"""vit_cifar on cifar10: the plain twin of ``cifar10_revvit``, the same recipe.

A ViT (pre-LN, mean pooling) for 32x32 images: patch 4 (64 tokens), D 192, 8 blocks, 3 heads,
MLP 4x, ~3.6M parameters; trained from scratch with the usual transformer recipe (DeiT-style,
shortened): AdamW (b2 0.999, weight decay 0.05 on kernels only), batch 128, lr 1e-3 with 5
epochs of linear warmup then cosine decay to 0 over 200 epochs (78,000 steps), label smoothing
0.1, gradient clipping at global norm 1, drop-path 0.1, and the pipeline's CIFAR augmentation
(random crop with 4-pixel padding, horizontal flip).

Prepare the data once, then train::

    python -m revjax.prepare cifar10 --data-dir ~/tensorflow_datasets
    python -m experiments.train --config cifar10_vit --workdir workdirs/cifar10_vit \\
        --set data_dir=~/tensorflow_datasets

Expected behaviour: the loss falls steadily after the warmup; ViTs trained from scratch on
CIFAR-10 with only crop/flip augmentation land well below the ResNets of the paper's table (no
figure has been measured here: this recipe has not been run to convergence). At start it
prints the compiled train-step memory of this model; compare with ``cifar10_revvit``, whose
activations do not grow with depth. Add ``--set compute_dtype="'bfloat16'"`` for bfloat16
compute with float32 parameters.
"""

from __future__ import annotations

import dataclasses

from experiments.configs.common import QUICK_RUN
from revjax.train import TrainConfig

# The transformer recipe shared with cifar10_revvit (200 epochs of 50,000 images at batch 128).
RECIPE = dict(
    dataset="cifar10",
    batch_size=128,
    eval_batch_size=500,
    num_steps=78_000,
    optimizer="adamw",
    learning_rate=1e-3,
    weight_decay=0.05,
    lr_schedule="cosine",
    warmup_steps=1_950,  # 5 epochs
    end_learning_rate=0.0,
    label_smoothing=0.1,
    grad_clip_norm=1.0,
    log_every=100,
    eval_every=3_900,
    checkpoint_every=3_900,
)

# Quick: two steps of a two-block, 32-wide model (tests, smoke runs; mock data works).
QUICK = dict(QUICK_RUN, warmup_steps=1)
QUICK_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def make_transformer_config(model: str, quick: bool = False) -> TrainConfig:
    """The transformer recipe for ``model`` on CIFAR-10 (``quick``: a tiny smoke variant)."""
    config = TrainConfig(model=model, model_overrides={"drop_path_rate": 0.1}, **RECIPE)
    if quick:
        config = dataclasses.replace(
            config, model_overrides={**config.model_overrides, **QUICK_MODEL}, **QUICK
        )
    return config


def get_config(quick: bool = False):
    return make_transformer_config("vit_cifar", quick)
