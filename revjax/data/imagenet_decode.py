"""ImageNet on the host: the JPEG header, the crop box, the reduced-scale decode into a uint8 crop.

The first half of `revjax.data.imagenet`'s input (its docstring describes the whole): the image
size comes from the JPEG header, the crop box is drawn from it (`revjax.data.transforms`'
sampler), and the JPEG is decoded at the smallest libjpeg DCT scale 1/d at which the crop still
has `image_size` pixels on each side, then the crop is resized bilinearly to uint8.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from revjax.data import transforms

# libjpeg's DCT scaling: a baseline JPEG decodes at 1/1, 1/2, 1/4 or 1/8 of its size for a
# fraction of the full decode's work (fewer DCT coefficients, smaller colour conversion).
JPEG_REDUCTIONS: tuple[int, ...] = (1, 2, 4, 8)

def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """`(height, width)` of a JPEG (or any image PIL reads) from its header, without decoding."""
    from PIL import Image

    sj = simplejpeg_module()
    if sj is not None and sj.is_jpeg(jpeg):
        height, width, _, _ = sj.decode_jpeg_header(jpeg)
        return height, width
    with Image.open(io.BytesIO(jpeg)) as im:
        return im.size[1], im.size[0]


def reduction_for(crop_height: int, crop_width: int, image_size: int, max_reduction: int = 8):
    """The largest d in `JPEG_REDUCTIONS` (<= `max_reduction`) with both crop sides / d >=
    `image_size`: decoding at 1/d then still shrinks (or keeps) the crop, never enlarges it."""
    side = min(crop_height, crop_width)
    for d in reversed(JPEG_REDUCTIONS):
        if d <= max_reduction and side >= d * image_size:
            return d
    return 1


def simplejpeg_module():
    """The `simplejpeg` module (libjpeg-turbo's TurboJPEG API), or None where it is not
    installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


DECODERS: tuple[str, ...] = ("auto", "simplejpeg", "pil")


def _reduction_of(height: int, width: int, decoded_hw, requested: int) -> int:
    """The d of a libjpeg output of size `decoded_hw`: libjpeg's 1/d image is
    `(ceil(height / d), ceil(width / d))`; the requested d first (tiny images fit several)."""
    for d in (requested, *JPEG_REDUCTIONS):
        if tuple(decoded_hw) == (-(-height // d), -(-width // d)):
            return d
    raise ValueError(
        f"The JPEG decoder returned {tuple(decoded_hw)} for a {height}x{width} image at 1/"
        f"{requested}: not a 1/1, 1/2, 1/4 or 1/8 scale."
    )


def _decode_reduced(jpeg: bytes, reduction: int, decoder: str = "auto"):
    """The JPEG decoded at 1/`reduction` (libjpeg DCT scaling) as an RGB PIL image, and the
    reduction actually used (1 for non-JPEG data).

    `decoder`: "simplejpeg" (libjpeg-turbo's TurboJPEG API through the `simplejpeg` package),
    "pil" (PIL's bundled libjpeg-turbo through `Image.draft`), "auto" (simplejpeg when
    installed); ``results/bench_input.md`` gives both rates side by side. Both run
    libjpeg-turbo's accurate integer DCT with fancy upsampling.
    """
    from PIL import Image

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
    sj = simplejpeg_module() if decoder in ("auto", "simplejpeg") else None
    if decoder == "simplejpeg" and sj is None:
        raise ImportError("decoder='simplejpeg' needs the simplejpeg package: "
                          "pip install simplejpeg")
    if sj is not None and sj.is_jpeg(jpeg):
        height, width, _, _ = sj.decode_jpeg_header(jpeg)
        # The smallest TurboJPEG scale whose output is at least these sizes is exactly 1/d.
        array = sj.decode_jpeg(jpeg, "RGB", min_height=height // reduction,
                               min_width=width // reduction)
        return Image.fromarray(array), _reduction_of(height, width, array.shape[:2], reduction)
    im = Image.open(io.BytesIO(jpeg))
    used = 1
    if reduction > 1 and im.format == "JPEG":
        # draft picks the largest 1/d with both sides >= the request; floor(size / d) asks for 1/d.
        full_width = im.size[0]
        result = im.draft("RGB", (full_width // reduction, im.size[1] // reduction))
        if result is not None:  # (mode, (0, 0, width / d, height / d))
            used = int(round(full_width / result[1][2]))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im, used


def decode_crop(
    jpeg: bytes,
    box: tuple[int, int, int, int],
    image_size: int,
    reduction: int | None = None,
    decoder: str = "auto",
) -> np.ndarray:
    """Decodes the region `box = (top, left, h, w)` of a JPEG, resized to uint8 `image_size`^2.

    The JPEG is decoded at 1/d (`reduction`, default `reduction_for(h, w, image_size)`) and
    the box is mapped to that image as `box / d` (libjpeg's pixel i at 1/d covers full-size
    pixels `[i d, (i + 1) d)`), so the output shows the same region of the photo as a
    full-size decode, cropped and resized; it differs only by the decoder's downscaling.

    Args:
      jpeg: encoded bytes (any format PIL reads; non-JPEGs are decoded at full size).
      box: `(top, left, h, w)` in full-size pixels.
      image_size: output side.
      reduction: 1, 2, 4 or 8.
      decoder: see `DECODERS` ("auto": simplejpeg when installed, else PIL).

    Returns:
      uint8 `[image_size, image_size, 3]`.
    """
    from PIL import Image

    top, left, h, w = box
    d = reduction_for(h, w, image_size) if reduction is None else reduction
    if d not in JPEG_REDUCTIONS:
        raise ValueError(f"reduction must be one of {JPEG_REDUCTIONS}, got {d!r}.")
    im, d = _decode_reduced(jpeg, d, decoder)
    region = (left / d, top / d, (left + w) / d, (top + h) / d)
    out = im.resize((image_size, image_size), Image.Resampling.BILINEAR, box=region)
    return np.asarray(out)


def _crop_from_array(image: np.ndarray, box, image_size: int) -> np.ndarray:
    """The same crop and resize from an already decoded uint8 image (sources that decode)."""
    from PIL import Image

    top, left, h, w = box
    image = np.asarray(image)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    pil = Image.fromarray(image)
    out = pil.resize((image_size, image_size), Image.Resampling.BILINEAR,
                     box=(left, top, left + w, top + h))
    return np.asarray(out)


def _encoded_size(image) -> tuple[int, int]:
    if isinstance(image, bytes | bytearray | memoryview):
        return jpeg_size(bytes(image))
    shape = np.shape(image)
    return shape[0], shape[1]


def _crop(image, box, setting) -> np.ndarray:
    """The crop of `box` by the setting's (`image_size`, `max_reduction`, `decoder`)."""
    if isinstance(image, bytes | bytearray | memoryview):
        d = reduction_for(box[2], box[3], setting.image_size, setting.max_reduction)
        return decode_crop(bytes(image), box, setting.image_size, d, setting.decoder)
    return _crop_from_array(image, box, setting.image_size)


@dataclasses.dataclass(frozen=True)
class ImageNetTrainCrop:
    """Grain `random_map` step: `{"image": JPEG bytes | uint8[H, W, 3], "label"}` ->
    `{"image": uint8[image_size, image_size, 3], "label": int32}`, an Inception crop decoded
    at reduced scale. `max_reduction=1` decodes at full size (the reference); `decoder`: see
    `decode_crop`."""

    image_size: int
    max_reduction: int = 8
    decoder: str = "auto"

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
        height, width = _encoded_size(example["image"])
        box = transforms.random_crop_box(height, width, rng)
        return {
            "image": _crop(example["image"], box, self),
            "label": np.int32(example["label"]),
        }


@dataclasses.dataclass(frozen=True)
class ImageNetEvalCrop:
    """Grain `map` step: the central 87.5 % crop, decoded at reduced scale, uint8, with
    `mask` 1.0 (evaluation batches are padded)."""

    image_size: int
    max_reduction: int = 8
    decoder: str = "auto"

    def __call__(self, example: Mapping[str, Any]) -> dict:
        height, width = _encoded_size(example["image"])
        box = transforms.central_crop_box(height, width)
        return {
            "image": _crop(example["image"], box, self),
            "label": np.int32(example["label"]),
            "mask": np.float32(1.0),
        }
