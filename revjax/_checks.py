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
