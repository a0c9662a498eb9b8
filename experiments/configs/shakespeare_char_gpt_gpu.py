"""gpt_char on character-level Shakespeare: nanoGPT's GPU recipe.

6 blocks, 6 heads, width 384, context 256, dropout 0.2, batch 64, 5,000 iterations, AdamW lr
1e-3 -> 1e-4 (cosine, 100 warmup steps), beta2 0.99, weight decay 0.1 (kernels and embeddings),
clipping 1, the exact GELU::

    python -m experiments.train --config shakespeare_char_gpt_gpu --workdir workdirs/sc_gpt_gpu

Expected: validation loss about 1.47 (nanoGPT's 1.4697 on tiny-shakespeare; ours is a larger
text of the same author).
"""

from experiments.configs.shakespeare_char_gpt import make_lm_config


def get_config(quick: bool = False):
    return make_lm_config("gpt_char", quick, gpu=True)
