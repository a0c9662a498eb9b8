"""The default, offline job: RevNet-38 on scikit-learn's digits (8x8 grey images, 10 classes).

Runs anywhere with no network and no prepared data (the digits ship inside scikit-learn), on
CPU in a few minutes; the README's main job (`make run`) runs it::

    python -m experiments.train --config digits --workdir workdirs/digits

The recipe is the paper's CIFAR one (SGD + momentum 0.9, weight decay 2e-4 on kernels, lr 0.1
dropping 10x twice), shortened to 400 steps of batch 100 (about 27 epochs of the 1,497
training images). Expected: above 95 % test accuracy on the 300 held-out digits (the test suite
checks a smaller network against that bound). It also prints the compiled train-step memory of
RevNet-38 with memory saving on and off, and of its ResNet-32 twin.
"""

from experiments.configs.common import make_config


def get_config(quick: bool = False):
    config = make_config(
        "revnet38",
        "digits",
        batch_size=100,
        eval_batch_size=100,
        num_steps=400,
        lr_boundaries=(250, 350),
        log_every=50,
        eval_every=200,
        checkpoint_every=200,
    )
    if quick:
        config = make_config("revnet38", "digits", quick=True)
    return config
