"""Input checks shared by the image models (RevNet / ResNet and RevViT / ViT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_images(name: str, x: jax.Array, in_channels: int, image_size: int | None = None):
    """Raises a ValueError naming the problem and the fix unless ``x`` is a float NHWC batch
    with ``in_channels`` channels (and, given ``image_size``, square images of that side)."""
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"{name} expects NHWC images of rank 4 [batch, height, width, channels]; got "
            f"shape {jnp.shape(x)}. Add a batch axis (x[None]) for a single image."
        )
    if x.shape[-1] != in_channels:
        _check_channels_first(name, x.shape, in_channels)
        raise ValueError(
            f"{name} was built for in_channels={in_channels} but the input has "
            f"{x.shape[-1]} channels (shape {x.shape}). Inputs are NHWC (channels last): "
            "transpose NCHW data with x.transpose(0, 2, 3, 1), or build the model with "
            f"in_channels={x.shape[-1]}."
        )
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"{name} was built for {image_size}x{image_size} images (its position "
            f"embedding has one entry per patch) but got {x.shape[1]}x{x.shape[2]}. Resize "
            f"the images, or build the model with image_size={x.shape[1]} (square images)."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} expects floating-point images; got dtype {x.dtype}. Cast to float "
            "first, e.g. x.astype(jnp.float32) / 255."
        )


def _check_channels_first(name: str, shape: tuple[int, ...], in_channels: int) -> None:
    """Raises the transpose advice for a batch that looks channels-first (NCHW).

    Called when the last axis is not ``in_channels``. Channels-first when axis 1 is
    ``in_channels``, or when axis 1 is narrower than the last axis and the last two axes are
    equal (a square image, channels first), in which case the model's ``in_channels`` differs
    from the data's too.
    """
    transpose = "Transpose to NHWC (channels last): x.transpose(0, 2, 3, 1)"
    if shape[1] == in_channels:
        raise ValueError(
            f"{name} expects NHWC images (channels last) but got shape {shape}, which is "
            f"channels-first (NCHW): axis 1 has the model's in_channels={in_channels}. "
            f"{transpose}."
        )
    if shape[1] < shape[3] and shape[2] == shape[3]:
        raise ValueError(
            f"{name} expects NHWC images (channels last) but got shape {shape}, which looks "
            f"channels-first (NCHW) with {shape[1]} channels, and the model was built for "
            f"in_channels={in_channels}. {transpose}, and build the model with "
            f"in_channels={shape[1]}."
        )
