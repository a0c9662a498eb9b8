"""revvit_tiny on digits over 8 devices with fsdp and tensor parallelism: mesh (1, 4, 2).

The `digits_revvit` recipe on a ``(data, fsdp, tensor) = (1, 4, 2)`` mesh: the batch split 4
ways, the attention heads and MLP hidden units 2 ways (`tensor`), every other large parameter
and AdamW's moments 4 ways (`fsdp`); parameters below
`revjax.train.sharding.MIN_SHARDED_SIZE` elements (the tiny model's norms and biases) stay
replicated. Needs 8 devices; on a CPU-only host::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.train --config digits_revvit_tensor \\
        --workdir workdirs/digits_revvit_tensor

Expected: the `digits_revvit` accuracy (above 90 % on the 300 held-out digits).
"""

import dataclasses

from experiments.configs import digits_revvit


def get_config(quick: bool = False):
    config = digits_revvit.get_config(quick)
    return dataclasses.replace(config, mesh=(1, 4, 2), num_devices=None)
