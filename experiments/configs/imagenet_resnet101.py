"""resnet101 on imagenet2012, the paper's recipe.

Target: the paper's ResNet baseline for revnet104; expect accuracy within a
few tenths of a percent of revnet104 on the same dataset.
Expected GPU time (an estimate, not measured here):
several days on 8 modern GPUs.
This recipe is not run to convergence on CPU.

Prepare the data once, then train::

    python -m revjax.prepare imagenet2012 --data_dir ~/tensorflow_datasets \
        --manual_dir DIR_WITH_ILSVRC2012_TARS
    python -m experiments.train --config imagenet_resnet101 \
        --workdir workdirs/imagenet_resnet101 \
        --set data_dir=~/tensorflow_datasets
"""

from experiments.configs.common import make_config


def get_config(quick: bool = False):
    return make_config("resnet101", "imagenet2012", quick)
