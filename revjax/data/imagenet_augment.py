"""ImageNet on the device: flip, colour jitter and scaling of uint8 crops inside the jitted step.

The second half of `revjax.data.imagenet`'s input: a left-right flip with probability 1/2, the
authors' colour jitter (brightness, saturation, hue, contrast in one of two orders per image,
clipped to [0, 1]) and the scaling to [-1, 1], keyed by `fold_in(augment_key(seed), step)`. On
CPU it equals the numpy reference (`revjax.data.transforms.imagenet_augment_reference`) bit for
bit for the same draws; on GPUs XLA may fuse multiply-adds, so the last bit can differ there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from revjax.data.transforms import (
    IMAGENET_BRIGHTNESS_DELTA,
    IMAGENET_CONTRAST_RANGE,
    IMAGENET_HUE_DELTA,
    IMAGENET_SATURATION_RANGE,
    PIXEL_SCALE,
)

# uint8 value -> float32 in [0, 1], as numpy's `u.astype(float32) * PIXEL_SCALE`.
_UNIT_TABLE = np.arange(256, dtype=np.float32) * PIXEL_SCALE
# Salt of the augmentation key, so the device draws do not reuse the model's init key.
_AUGMENT_SALT = 0x1A6E


class JitterDraws(NamedTuple):
    """Per-image random values of the device augmentation, each `[B]`.

    flip: bool, mirror left-right. brightness: float32 delta on [0, 1] pixels. saturation,
    contrast: float32 factors. hue: float32 rotation (fraction of a turn). saturation_first:
    bool, the order (saturation + hue, then contrast; or contrast first).
    """

    flip: jax.Array
    brightness: jax.Array
    saturation: jax.Array
    hue: jax.Array
    contrast: jax.Array
    saturation_first: jax.Array


def augment_key(seed: int) -> jax.Array:
    """The key of the device augmentation of run `seed`; step k draws from `fold_in(., k)`."""
    return jax.random.fold_in(jax.random.key(seed), _AUGMENT_SALT)


def draw_jitter(key: jax.Array, batch_size: int) -> JitterDraws:
    """Draws the flips and the jitter of a batch: uniform on the authors' ranges, p = 1/2."""
    keys = jax.random.split(key, 6)

    def uniform(k, low, high):
        return jax.random.uniform(k, (batch_size,), jnp.float32, low, high)

    return JitterDraws(
        flip=jax.random.bernoulli(keys[0], 0.5, (batch_size,)),
        brightness=uniform(keys[1], -IMAGENET_BRIGHTNESS_DELTA, IMAGENET_BRIGHTNESS_DELTA),
        saturation=uniform(keys[2], *IMAGENET_SATURATION_RANGE),
        hue=uniform(keys[3], -IMAGENET_HUE_DELTA, IMAGENET_HUE_DELTA),
        contrast=uniform(keys[4], *IMAGENET_CONTRAST_RANGE),
        saturation_first=jax.random.bernoulli(keys[5], 0.5, (batch_size,)),
    )


def _tree_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis by halving (zero-padded to a power of two): the association
    `transforms.tree_sum` uses, so both give the same float32 bits."""
    n = x.shape[-1]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], size - n), x.dtype)], axis=-1)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def _product(a, b):
    """`a * b` rounded to float32 on its own before any addition.

    XLA fuses a multiply feeding an add into one fused multiply-add (a single rounding), where
    numpy rounds twice; the select (a no-op on finite values) keeps the product separate, so
    the jitter matches its numpy reference bit for bit.
    """
    p = a * b
    return jnp.where(p == p, p, jnp.float32(0))


def _rgb_to_hsv(r, g, b):
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    delta = maxc - jnp.minimum(jnp.minimum(r, g), b)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    s = delta / jnp.maximum(maxc, tiny)
    inv = 1 / jnp.maximum(delta, tiny)
    h = 4 + _product(r - g, inv)
    h = jnp.where(g == maxc, 2 + _product(b - r, inv), h)
    h = jnp.where(r == maxc, (g - b) * inv, h)
    h = jnp.where(delta > 0, jnp.remainder(h * jnp.float32(1 / 6), 1), 0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    h6 = _product(h, jnp.float32(6))
    i = jnp.floor(h6)
    f = h6 - i
    p = v * (1 - s)
    q = v * (1 - _product(s, f))
    t = v * (1 - _product(s, 1 - f))
    i = jnp.remainder(i.astype(jnp.int32), 6)

    def choose(*options):
        out = options[5]
        for k in range(4, -1, -1):
            out = jnp.where(i == k, options[k], out)
        return out

    return choose(v, q, p, p, t, v), choose(t, v, v, q, p, p), choose(p, p, t, v, v, q)


def _saturation_and_hue(planes, saturation, hue):
    h, s, v = _rgb_to_hsv(*planes)
    s = jnp.clip(s * saturation, 0, 1)
    h = jnp.remainder(h + hue, 1)
    return _hsv_to_rgb(h, s, v)


def _contrast(planes, contrast):
    out = []
    for c in planes:  # [B, H, W]
        flat = c.reshape(c.shape[0], -1)
        mean = _product(_tree_sum(flat), jnp.float32(1 / flat.shape[1]))[:, None, None]
        out.append(_product(c - mean, contrast) + mean)
    return tuple(out)


def augment_batch(
    images: jax.Array, draws: JitterDraws, color_jitter: bool = True
) -> jax.Array:
    """Flip, colour jitter and scaling to [-1, 1] of uint8 crops, in JAX (jit it).

    Args:
      images: uint8 `[B, H, W, 3]`, the host's crops.
      draws: `draw_jitter(key, B)`.
      color_jitter: False: flip and scaling only.

    Returns:
      float32 `[B, H, W, 3]` in [-1, 1].
    """
    x = jnp.where(draws.flip[:, None, None, None], images[:, :, ::-1], images)
    # A table lookup, not a multiply: XLA would fuse `u * scale + brightness` into one FMA.
    x = jnp.take(jnp.asarray(_UNIT_TABLE), x.astype(jnp.int32), mode="clip")
    if color_jitter:
        col = lambda a: a[:, None, None]  # noqa: E731  [B] -> [B, 1, 1]
        planes = tuple(x[..., c] + col(draws.brightness) for c in range(3))  # [B, H, W] each
        sat, hue, con = col(draws.saturation), col(draws.hue), col(draws.contrast)
        pick = col(draws.saturation_first)
        # Each image takes one order; the HSV round trip (the costly part) runs once for all:
        # contrast before it where contrast comes first, after it where it comes second.
        planes = tuple(jnp.where(pick, a, b) for a, b in zip(planes, _contrast(planes, con)))
        planes = _saturation_and_hue(planes, sat, hue)
        planes = tuple(jnp.where(pick, a, b) for a, b in zip(_contrast(planes, con), planes))
        x = jnp.clip(jnp.stack(planes, axis=-1), 0, 1)
    return x * 2 - 1


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 -> float32 in [-1, 1] (evaluation), as `augment_batch` without augmentation."""
    return images.astype(jnp.float32) * jnp.float32(PIXEL_SCALE) * 2 - 1
