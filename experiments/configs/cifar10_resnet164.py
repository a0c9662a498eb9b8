"""resnet164 on cifar10, the paper's recipe.

Target: the paper's ResNet baseline for revnet164; expect accuracy within a
few tenths of a percent of revnet164 on the same dataset.
Expected GPU time (an estimate, not measured here):
about 5 h on one modern GPU.
This recipe is not run to convergence on CPU.

Input: the per-pixel mean image subtracted from every example is the mean over the training
split only (50,000 images); the authors' code averaged train and test together. Ours never looks
at test data, so the test accuracy stays a held-out figure (the difference between the two means
is a small fixed offset of the input, not measured here).

Prepare the data once, then train::

    python -m revjax.prepare cifar10 --data_dir ~/tensorflow_datasets
    python -m experiments.train --config cifar10_resnet164 --workdir workdirs/cifar10_resnet164 \
        --set data_dir=~/tensorflow_datasets
"""

from experiments.configs.common import make_config


def get_config(quick: bool = False):
    return make_config("resnet164", "cifar10", quick)
