"""revgpt_char_cpu fine-tuned on four held-out plays from a GPT pretrained on the other works.

``init_from`` reads the GPT-2 checkpoint that ``shakespeare_char_gpt_pretrain`` exports (a
char GPT trained on every work but Hamlet, Macbeth, Romeo and Juliet and The Tempest) and
converts it with `RevGPT.from_gpt` (attention as F, MLP as G; the same parameters); the run
fine-tunes it on those four plays (``shakespeare_char_heldout``: the same vocabulary, its
first 90 % for training, the last 10 % for validation). nanoGPT's CPU recipe (its exact GELU,
as the checkpoint's) but 500 steps, warmup 50::

    python -m experiments.train --config shakespeare_char_revgpt_finetune \\
        --workdir workdirs/sc_revgpt_ft
    python -m experiments.train --config shakespeare_char_revgpt_finetune \\
        --set init_from=None --workdir workdirs/sc_revgpt_scratch   # the same from scratch

``--quick`` reads ``workdirs/sc_gpt_pretrain_quick/gpt2/model.safetensors`` (the quick
pretraining's export; see ``--describe shakespeare_char_gpt_pretrain``). Expected: the
converted model ends well below the same RevGPT trained from scratch for the same steps, and
a little above the GPT fine-tuned without conversion (the conversion moves the skip
connections, which the fine-tuning has to make up for): ``python -m experiments.bench_lm
finetune`` measures all three (``results/bench_lm_finetune.md``).
"""

import dataclasses

from experiments.configs.shakespeare_char_gpt import make_lm_config

SOURCE = "workdirs/sc_gpt_pretrain/gpt2/model.safetensors"
QUICK_SOURCE = "workdirs/sc_gpt_pretrain_quick/gpt2/model.safetensors"
FINETUNE = dict(dataset="shakespeare_char_heldout", num_steps=500, warmup_steps=50,
                eval_every=250, checkpoint_every=250)


def get_config(quick: bool = False):
    config = dataclasses.replace(make_lm_config("revgpt_char_cpu"), **FINETUNE,
                                 init_from=SOURCE)
    if quick:  # the quick pretraining's model shape and a few steps
        quick_config = make_lm_config("revgpt_char_cpu", quick=True)
        config = dataclasses.replace(quick_config, dataset=FINETUNE["dataset"],
                                     init_from=QUICK_SOURCE)
    return config
