"""revnet104 on imagenet2012, the paper's recipe.

Target (the RevNet authors' code): 23.1 % top-1 error (76.9 % top-1 accuracy).
Expected GPU time (an estimate, not measured here):
several days on 8 modern GPUs.
This recipe is not run to convergence on CPU.

Prepare the data once, then train::

    python -m revjax.prepare imagenet2012 --data_dir ~/tensorflow_datasets \
        --manual_dir DIR_WITH_ILSVRC2012_TARS
    python -m experiments.train --config imagenet_revnet104 \
        --workdir workdirs/imagenet_revnet104 \
        --set data_dir=~/tensorflow_datasets
"""

from experiments.configs.common import make_config


def get_config(quick: bool = False):
    return make_config("revnet104", "imagenet2012", quick)
