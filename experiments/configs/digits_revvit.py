"""revvit_tiny on scikit-learn's digits: a reversible transformer offline, on CPU in minutes.

A tiny RevViT (8x8 grey images, patch 2 so 16 tokens, D 32, 2 reversible blocks, 2 heads,
MLP 2x; 18,538 parameters with 10 classes) trained with the transformer options: AdamW (weight
decay 0.05 on kernels), lr 1e-2 with 20 warmup steps then cosine decay to 0, label smoothing
0.1, gradient clipping at norm 1, drop-path 0.05, batch 100, 300 steps (20 epochs of the
1,497 training digits)::

    python -m experiments.train --config digits_revvit --workdir workdirs/digits_revvit

Expected: above 90 % test accuracy on the 300 held-out digits (``tests/test_vit.py`` checks
this bound with the same recipe; 95 % in the run measured when it was written).
"""

import dataclasses

from experiments.configs.cifar10_vit import QUICK
from revjax.train import TrainConfig


def get_config(quick: bool = False):
    config = TrainConfig(
        model="revvit_tiny",
        model_overrides={"drop_path_rate": 0.05},
        dataset="digits",
        batch_size=100,
        eval_batch_size=100,
        num_steps=300,
        optimizer="adamw",
        learning_rate=1e-2,
        weight_decay=0.05,
        lr_schedule="cosine",
        warmup_steps=20,
        label_smoothing=0.1,
        grad_clip_norm=1.0,
        log_every=50,
        eval_every=150,
        checkpoint_every=150,
    )
    if quick:
        config = dataclasses.replace(config, **QUICK)
    return config
