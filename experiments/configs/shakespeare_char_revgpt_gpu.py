"""revgpt_char on character-level Shakespeare: nanoGPT's GPU recipe, the reversible twin.

The recipe of ``shakespeare_char_gpt_gpu`` on `revjax.RevGPT`::

    python -m experiments.train --config shakespeare_char_revgpt_gpu --workdir workdirs/sc_rev_gpu

Expected: the GPT's validation loss within a few hundredths.
"""

from experiments.configs.shakespeare_char_gpt import make_lm_config


def get_config(quick: bool = False):
    return make_lm_config("revgpt_char", quick, gpu=True)
