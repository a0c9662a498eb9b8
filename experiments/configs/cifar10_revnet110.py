"""revnet110 on cifar10, the paper's recipe.

Target (the RevNet authors' code): 94.0 % test accuracy.
Expected GPU time (an estimate, not measured here):
about 4 h on one modern GPU.
This recipe is not run to convergence on CPU.

Prepare the data once, then train::

    python -m revjax.prepare cifar10 --data_dir ~/tensorflow_datasets
    python -m experiments.train --config cifar10_revnet110 --workdir workdirs/cifar10_revnet110 \
        --set data_dir=~/tensorflow_datasets
"""

from experiments.configs.common import make_config


def get_config(quick: bool = False):
    return make_config("revnet110", "cifar10", quick)
