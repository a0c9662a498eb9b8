"""The paper's CIFAR and ImageNet rows (Gomez et al. 2017), one table.

Each row is a config named ``<dataset>_<model>`` (``cifar10_revnet38``, ``imagenet_resnet101``):
``python -m experiments.train --config cifar10_revnet38``. Every row trains the shared recipe of
`experiments.configs.common.make_config`; a row adds only what differs: the model, the dataset,
the target accuracy and where it comes from, and an estimate of the GPU time. `describe` gives a
row's full description (``--describe NAME`` on the command line).

This module imports nothing heavy: ``--help`` lists the rows without importing JAX.
"""

from __future__ import annotations

import dataclasses

# Where the RevNet rows' targets come from: the authors' code (renmengye/revnet-public).
AUTHORS = "the RevNet authors' code"

CIFAR_INPUT_NOTE = """\
Input: the per-pixel mean image subtracted from every example is the mean over the training
split only (50,000 images); the authors' code averaged train and test together. Ours never looks
at test data, so the test accuracy stays a held-out figure (the difference between the two means
is a small fixed offset of the input, not measured here)."""


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of the paper's tables, trained with the shared recipe.

    Attributes:
      model: the `revjax.presets` name (``revnet38``, ``resnet32``...).
      dataset: ``cifar10``, ``cifar100`` or ``imagenet2012``.
      target: the accuracy to expect (a ResNet baseline: relative to its RevNet twin).
      source: where ``target`` comes from.
      gpu_time: an estimate of the time to train on GPUs (not measured here).
    """

    model: str
    dataset: str
    target: str
    source: str
    gpu_time: str

    @property
    def name(self) -> str:
        """The config name: ``<dataset>_<model>``, ``imagenet`` for ``imagenet2012``."""
        return f"{self.dataset.removesuffix('2012')}_{self.model}"

    @property
    def summary(self) -> str:
        """One line: what the row trains (``--help`` lists it)."""
        return f"{self.model} on {self.dataset}, the paper's recipe."


def _revnet(model: str, dataset: str, accuracy: str, gpu_time: str) -> PaperRow:
    return PaperRow(model, dataset, accuracy, AUTHORS, gpu_time)


def _baseline(model: str, dataset: str, revnet: str, gpu_time: str) -> PaperRow:
    target = f"within a few tenths of a percent of {revnet} on the same dataset"
    return PaperRow(model, dataset, target, f"the paper's ResNet baseline for {revnet}", gpu_time)


_ONE_GPU = "on one modern GPU"
_IMAGENET_TIME = "several days on 8 modern GPUs"

ROWS: tuple[PaperRow, ...] = (
    _revnet("revnet38", "cifar10", "93.1 % test accuracy", f"about 1.5 h {_ONE_GPU}"),
    _revnet("revnet110", "cifar10", "94.0 % test accuracy", f"about 4 h {_ONE_GPU}"),
    _revnet("revnet164", "cifar10", "94.6 % test accuracy", f"about 6.5 h {_ONE_GPU}"),
    _baseline("resnet32", "cifar10", "revnet38", f"about 1 h {_ONE_GPU}"),
    _baseline("resnet110", "cifar10", "revnet110", f"about 3 h {_ONE_GPU}"),
    _baseline("resnet164", "cifar10", "revnet164", f"about 5 h {_ONE_GPU}"),
    _revnet("revnet38", "cifar100", "71.2 % test accuracy", f"about 1.5 h {_ONE_GPU}"),
    _revnet("revnet110", "cifar100", "74.0 % test accuracy", f"about 4 h {_ONE_GPU}"),
    _revnet("revnet164", "cifar100", "76.4 % test accuracy", f"about 6.5 h {_ONE_GPU}"),
    _baseline("resnet32", "cifar100", "revnet38", f"about 1 h {_ONE_GPU}"),
    _baseline("resnet110", "cifar100", "revnet110", f"about 3 h {_ONE_GPU}"),
    _baseline("resnet164", "cifar100", "revnet164", f"about 5 h {_ONE_GPU}"),
    _revnet("revnet104", "imagenet2012", "23.1 % top-1 error (76.9 % top-1 accuracy)",
            _IMAGENET_TIME),
    _baseline("resnet101", "imagenet2012", "revnet104", _IMAGENET_TIME),
)

BY_NAME: dict[str, PaperRow] = {row.name: row for row in ROWS}


def commands(row: PaperRow) -> str:
    """The commands that prepare the row's dataset and train it, one per line."""
    prepare = f"python -m revjax.prepare {row.dataset} --data-dir ~/tensorflow_datasets"
    if row.dataset == "imagenet2012":
        prepare += " \\\n    --manual-dir DIR_WITH_ILSVRC2012_TARS"
    train = (f"python -m experiments.train --config {row.name} \\\n"
             f"    --workdir workdirs/{row.name} --set data_dir=~/tensorflow_datasets")
    return f"{prepare}\n{train}"


def describe(name: str) -> str:
    """A row's full description: the summary, target, GPU time, input note and commands."""
    row = BY_NAME[name]
    parts = [
        row.summary,
        f"Target ({row.source}): {row.target}.\n"
        f"Expected GPU time (an estimate, not measured here): {row.gpu_time}.\n"
        "This recipe is not run to convergence on CPU.",
    ]
    if row.dataset.startswith("cifar"):
        parts.append(CIFAR_INPUT_NOTE)
    indented = "\n".join("    " + line for line in commands(row).splitlines())
    parts.append(f"Prepare the data once, then train::\n\n{indented}")
    return "\n\n".join(parts) + "\n"


def get_config(name: str, quick: bool = False):
    """The `revjax.train.TrainConfig` of the row called ``name`` (``quick``: its smoke variant)."""
    from experiments.configs.common import make_config

    row = BY_NAME[name]
    return make_config(row.model, row.dataset, quick)


def markdown_table() -> str:
    """Every row as a Markdown table: config name, model, dataset, target, source, GPU time."""
    lines = ["| `--config` | model | dataset | target | source | expected GPU time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in ROWS:
        lines.append(f"| `{row.name}` | `{row.model}` | {row.dataset} | {row.target} | "
                     f"{row.source} | {row.gpu_time} |")
    return "\n".join(lines) + "\n"
