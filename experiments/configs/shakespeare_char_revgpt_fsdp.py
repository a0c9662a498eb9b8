"""revgpt_char_cpu on character-level Shakespeare over 8 devices: mesh (data 2, fsdp 2, tensor 2).

The recipe of ``shakespeare_char_revgpt`` at batch 16 instead of 12 (the 4 batch shards divide
it) on a ``(data, fsdp, tensor) = (2, 2, 2)`` mesh: the batch split over data and fsdp, the
token embedding, attention and MLP kernels split over fsdp along the model width and over tensor
along heads, hidden units and vocabulary (`revjax.train.sharding.GPT_RULES`), each block's
kernels gathered inside the reversible scan one block at a time. Needs 8 devices; on a
CPU-only host::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.train --config shakespeare_char_revgpt_fsdp \\
        --workdir workdirs/sc_revgpt_fsdp

Expected: ``shakespeare_char_revgpt``'s validation loss; training on one device and on this mesh
differ by reduction order only (tests/test_sharding.py).
"""

import dataclasses

from experiments.configs.shakespeare_char_gpt import make_lm_config


def get_config(quick: bool = False):
    config = make_lm_config("revgpt_char_cpu", quick)
    return dataclasses.replace(config, mesh=(2, 2, 2), num_devices=None,
                               batch_size=8 if quick else 16)
