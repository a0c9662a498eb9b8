"""RevNet-38 on digits over 8 devices with its parameters sharded: mesh (data 2, fsdp 4).

The `digits` job (the paper's CIFAR recipe, 400 steps, at batch 96 instead of 100: the 8 batch
shards divide it) on a ``(data, fsdp, tensor) = (2, 4, 1)`` mesh: the batch split 8 ways,
every conv kernel above `revjax.train.sharding.MIN_SHARDED_SIZE` elements (and its momentum)
split 4 ways along its output channels, gathered inside each stage's reversible scan one unit
at a time. Needs 8 devices; on a CPU-only host::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.train --config digits_fsdp --workdir workdirs/digits_fsdp

Expected: the `digits` job's accuracy (above 95 % on the 300 held-out digits); training on one
device and on this mesh differ by reduction order only (tests/test_sharding.py).
"""

import dataclasses

from experiments.configs.common import make_config


def get_config(quick: bool = False):
    full = dict(batch_size=96, eval_batch_size=96, num_steps=400, lr_boundaries=(250, 350),
                log_every=50, eval_every=200, checkpoint_every=200)
    config = make_config("revnet38", "digits", quick=quick, **({} if quick else full))
    return dataclasses.replace(config, mesh=(2, 4, 1), num_devices=None)
