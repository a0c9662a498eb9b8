"""gpt_char_cpu on character-level Shakespeare: nanoGPT's CPU recipe, the GPT twin.

nanoGPT's ``shakespeare_char`` CPU command line (4 blocks, 4 heads, width 128, context 64;
812,288 parameters with the 84 characters of the prepared text), batch 12, 2,000 iterations,
dropout 0, AdamW with lr 1e-3 after 100 warmup steps (nanoGPT's ramp: step t of the warmup at
(t + 1) / 101 of it), cosine to 1e-4 at the end, beta2 0.99,
weight decay 0.1 on the linear layers' kernels and the token and position embeddings (nanoGPT's
rule; `revjax.train.weight_decay_mask`), gradient clipping at norm 1, and nanoGPT's exact (erf)
GELU (``mlp="gelu_exact"``; the presets keep GPT-2's tanh GELU). Prepare the data once, then::

    python -m revjax.prepare shakespeare_char
    python -m experiments.train --config shakespeare_char_gpt --workdir workdirs/sc_gpt
    python -m experiments.sample --workdir workdirs/sc_gpt

Expected: validation loss about 1.88 (nanoGPT's figure on tiny-shakespeare;
``experiments/bench_lm.py accuracy`` measures GPT against RevGPT on this text over seeds).
``gpu=True`` (configs ``shakespeare_char_gpt_gpu``) is nanoGPT's GPU recipe: 6 blocks, 6 heads,
width 384, context 256, dropout 0.2, batch 64, 5,000 iterations (1.4697 on tiny-shakespeare).
"""

import dataclasses

from revjax.train import TrainConfig

# nanoGPT's recipe for shakespeare_char (config/train_shakespeare_char.py and its README's CPU
# command line).
CPU_RECIPE = dict(
    dataset="shakespeare_char",
    batch_size=12,
    eval_batch_size=240,
    num_steps=2000,
    optimizer="adamw",
    learning_rate=1e-3,
    end_learning_rate=1e-4,
    lr_schedule="cosine",
    warmup_steps=100,
    warmup_start="nanogpt",
    adam_b2=0.99,
    weight_decay=0.1,
    grad_clip_norm=1.0,
    log_every=100,
    eval_every=500,
    checkpoint_every=500,
    memory_report=False,
)
GPU_RECIPE = dict(CPU_RECIPE, batch_size=64, num_steps=5000, eval_every=250,
                  checkpoint_every=1000, log_every=50)
# nanoGPT's model beyond the presets' shapes: the erf GELU of PyTorch's nn.GELU() (the presets
# keep GPT-2's tanh GELU; a GPT-2 checkpoint names either in its activation_function).
NANOGPT_MODEL = {"mlp": "gelu_exact"}
# A few steps of a tiny model on one device: seconds, for tests and smoke runs.
QUICK = dict(num_steps=30, warmup_steps=3, batch_size=8, eval_batch_size=32, log_every=10,
             eval_every=0, checkpoint_every=0, num_devices=1)
QUICK_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "context_length": 32, "unroll": 1}


def make_lm_config(model: str, quick: bool = False, gpu: bool = False) -> TrainConfig:
    """nanoGPT's CPU recipe (``gpu``: its GPU recipe) for the preset ``model``, with nanoGPT's
    exact GELU."""
    overrides = dict(NANOGPT_MODEL)
    config = TrainConfig(model=model, model_overrides=overrides,
                         **(GPU_RECIPE if gpu else CPU_RECIPE))
    if quick:
        config = dataclasses.replace(config, model_overrides={**overrides, **QUICK_MODEL},
                                     **QUICK)
    return config


def get_config(quick: bool = False):
    return make_lm_config("gpt_char_cpu", quick)
