"""Prepare a TFDS dataset once as ArrayRecord files, for `revjax.data` to read without TensorFlow.

Usage::

    pip install 'revjax[prepare]'
    python -m revjax.prepare cifar10 --data_dir ~/tensorflow_datasets
    python -m revjax.prepare cifar10 cifar100 --data_dir DIR
    python -m revjax.prepare imagenet2012 --data_dir DIR --manual_dir DIR_WITH_TARS

This is the only place that needs TensorFlow (TFDS generates datasets with it). CIFAR is
downloaded from its registered URL (or taken from `--download_dir` if the archive is already
there under TFDS's download name); ImageNet must be downloaded by hand: put
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in the manual directory (default
`<download_dir>/manual`, with `<download_dir>` defaulting to `<data_dir>/downloads`). For CIFAR
the training mean image is computed and cached next to the data as well.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from revjax import data

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def _require_tensorflow() -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "Preparing TFDS datasets needs TensorFlow (training does not): "
            "pip install 'revjax[prepare]'"
        ) from e


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    download_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> str:
    """Downloads (if needed) and writes one TFDS dataset as ArrayRecord files.

    Args:
      name: one of `revjax.data.TFDS_DATASETS`.
      data_dir: TFDS data directory to write into (the trainer's `data_dir`).
      download_dir: where archives are downloaded and extracted (default `<data_dir>/downloads`).
      manual_dir: where manually downloaded files are (default `<download_dir>/manual`).

    Returns:
      The directory holding the prepared dataset version.

    Raises:
      ValueError: unknown dataset, or one that needs no preparation (digits).
      FileNotFoundError: ImageNet tar files are missing from `manual_dir`.
    """
    if name not in data.TFDS_DATASETS:
        if name in data.KNOWN_DATASETS:
            raise ValueError(f"{name!r} is embedded in revjax and needs no preparation.")
        raise ValueError(
            f"Unknown dataset {name!r}; datasets to prepare: {', '.join(data.TFDS_DATASETS)}."
        )
    data_dir = os.path.expanduser(os.fspath(data_dir))
    download_dir = os.path.expanduser(
        os.fspath(download_dir) if download_dir else os.path.join(data_dir, "downloads")
    )
    manual_dir = os.path.expanduser(
        os.fspath(manual_dir) if manual_dir else os.path.join(download_dir, "manual")
    )
    if name == "imagenet2012":
        missing = [
            f for f in IMAGENET_MANUAL_FILES if not os.path.isfile(os.path.join(manual_dir, f))
        ]
        if missing:
            raise FileNotFoundError(
                f"ImageNet needs {' and '.join(missing)} in {manual_dir} (download them from "
                "https://image-net.org/ after registering; TFDS cannot fetch them)."
            )
    _require_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    if name in ("cifar10", "cifar100"):
        data.mean_image(name, data_dir)  # computed once here so training starts at once
    return builder.data_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: `python -m revjax.prepare NAME [NAME ...] --data_dir DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m revjax.prepare",
        description="Prepare TFDS datasets as ArrayRecord files for revjax (needs TensorFlow).",
    )
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        choices=data.TFDS_DATASETS,
        help="dataset(s) to prepare: " + ", ".join(data.TFDS_DATASETS),
    )
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
    parser.add_argument(
        "--download_dir",
        default=None,
        help="download/extract directory (default: DATA_DIR/downloads)",
    )
    parser.add_argument(
        "--manual_dir",
        default=None,
        help="manually downloaded files, e.g. the ImageNet tars (default: DOWNLOAD_DIR/manual)",
    )
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            path = prepare(name, args.data_dir, args.download_dir, args.manual_dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{name}: prepared in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
