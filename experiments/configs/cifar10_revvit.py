"""revvit_cifar on cifar10: the reversible ViT (Mangalam et al., CVPR 2022), CIFAR-sized.

The same network as ``cifar10_vit`` (patch 4, D 192, 8 blocks, 3 heads, MLP 4x) with every
block a reversible unit (F = LayerNorm + attention, G = LayerNorm + MLP, two token streams
concatenated, normalised and mean-pooled at the end), and the same recipe: AdamW (weight decay
0.05 on kernels only), batch 128, lr 1e-3, 5 warmup epochs then cosine decay over 200 epochs
(78,000 steps), label smoothing 0.1, gradient clipping at norm 1, drop-path 0.1, crop/flip
augmentation.

Prepare the data once, then train::

    python -m revjax.prepare cifar10 --data-dir ~/tensorflow_datasets
    python -m experiments.train --config cifar10_revvit --workdir workdirs/cifar10_revvit \\
        --set data_dir=~/tensorflow_datasets

Expected behaviour: training follows ``cifar10_vit`` closely (the RevViT paper reports equal
accuracy for RevViT and ViT/DeiT on ImageNet; no CIFAR figure has been measured here: this
recipe has not been run to convergence). At start it prints the compiled train-step memory
with memory saving on and off: the reversible backward stores no per-block activations, so
its activation memory stays flat in depth (``results/bench_vit.md``). Add
``--set compute_dtype="'bfloat16'"`` for bfloat16 compute with float32 streams.
"""

from experiments.configs.cifar10_vit import make_transformer_config


def get_config(quick: bool = False):
    return make_transformer_config("revvit_cifar", quick)
