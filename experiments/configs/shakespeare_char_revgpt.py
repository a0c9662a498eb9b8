"""revgpt_char_cpu on character-level Shakespeare: nanoGPT's CPU recipe, the reversible twin.

The recipe of ``shakespeare_char_gpt`` on `revjax.RevGPT` (every block a reversible unit,
fixed-point streams; the same parameters as the GPT)::

    python -m experiments.train --config shakespeare_char_revgpt --workdir workdirs/sc_revgpt

Expected: the GPT's validation loss within 0.03 (``experiments/bench_lm.py accuracy``).
"""

from experiments.configs.shakespeare_char_gpt import make_lm_config


def get_config(quick: bool = False):
    return make_lm_config("revgpt_char_cpu", quick)
