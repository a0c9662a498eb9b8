"""revvit_tiny fine-tuned on all ten digits from a ViT pretrained on digits 0-4 (timm format).

The trainer's fine-tuning options: ``init_from`` reads a timm ``.safetensors`` ViT checkpoint
and converts it with `RevViT.from_vit` (its 5-class head is replaced by a fresh 10-class one,
said in the log), ``layer_decay=0.75`` (block i of 2 learns at 0.75^(2-i) times the head's
rate, the embeddings at 0.75^3) and ``freeze=("embed",)`` (patch and position embedding keep
their pretrained values). AdamW lr 3e-3, 10 warmup steps then cosine, batch 64, 100 steps::

    python -m experiments.bench_finetune --no-memory \\
        --save-source workdirs/digits04_vit.safetensors      # pretrain on 0-4, save (~1 min)
    python -m experiments.train --config digits_revvit_finetune --workdir workdirs/digits_ft

Any timm ViT state dict or big_vision ``.npz`` with this model's architecture works the same
way (``--set init_from=path``); the image size may differ (the position embedding is
resampled). The notebook ``05_finetune_pretrained`` runs the 0-4 -> 5-9 transfer against
training from scratch.
"""

import dataclasses

from experiments.configs.cifar10_vit import QUICK
from revjax.train import TrainConfig


def get_config(quick: bool = False):
    config = TrainConfig(
        model="revvit_tiny",
        dataset="digits",
        init_from="workdirs/digits04_vit.safetensors",
        layer_decay=0.75,
        freeze=("embed",),
        batch_size=64,
        eval_batch_size=100,
        num_steps=100,
        optimizer="adamw",
        learning_rate=3e-3,
        weight_decay=0.05,
        lr_schedule="cosine",
        warmup_steps=10,
        log_every=20,
        eval_every=50,
        checkpoint_every=50,
    )
    if quick:
        config = dataclasses.replace(config, **QUICK)
    return config
