"""timm's ViT layout: the architecture a state dict describes, its keys and shapes, and loading
it into a `revjax.ViT` (the table in `revjax.pretrained`'s docstring)."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from revjax.pretrained.checkpoint_files import CheckpointMismatch, read_source
from revjax.vit import ViT

_log = logging.getLogger(__name__)

#: timm's ViT presets this module reads and writes (names as `timm.create_model` takes them),
#: each with its architecture (`image_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`).
TIMM_VARIANTS: dict[str, dict[str, int]] = {
    f"vit_{size}_patch16_{image}": dict(
        image_size=image, patch_size=16, embed_dim=width, depth=12, num_heads=heads
    )
    for size, width, heads in (("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12))
    for image in (224, 384)
}
# timm's ViT widths and their head counts (a state dict does not record the head count).
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}

# timm's resampling of the position embedding for state dicts (`checkpoint_filter_fn`).
STATE_DICT_RESIZE = dict(method="bicubic", antialias=True)

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")

# Per block: timm suffix -> (revjax branch, revjax leaf path). Linear weights are transposed.
BLOCK_LEAVES = {
    "norm1.weight": ("attn", ("norm", "scale")),
    "norm1.bias": ("attn", ("norm", "bias")),
    "attn.qkv.weight": ("attn", ("qkv", "kernel")),
    "attn.qkv.bias": ("attn", ("qkv", "bias")),
    "attn.proj.weight": ("attn", ("proj", "kernel")),
    "attn.proj.bias": ("attn", ("proj", "bias")),
    "norm2.weight": ("mlp", ("norm", "scale")),
    "norm2.bias": ("mlp", ("norm", "bias")),
    "mlp.fc1.weight": ("mlp", ("fc1", "kernel")),
    "mlp.fc1.bias": ("mlp", ("fc1", "bias")),
    "mlp.fc2.weight": ("mlp", ("fc2", "kernel")),
    "mlp.fc2.bias": ("mlp", ("fc2", "bias")),
}



def timm_config(state: Mapping[str, Any], *, num_heads: int | None = None) -> dict[str, Any]:
    """The `ViT` arguments of a timm ViT state dict (read from its keys and shapes).

    Args:
      state: ``{key: array}``, timm's names.
      num_heads: attention heads; a state dict does not record them (default: timm's count
        for the width: 192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16).

    Returns:
      ``dict(image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes,
      in_channels, pool)``; ``num_classes`` is 0 for a state dict without a head.

    Raises:
      CheckpointMismatch: keys the layout needs are missing, or it is a variant `ViT` cannot
        express (register tokens, layer scale, a pre-norm, no class token with ``fc_norm``...).
    """
    problems = []
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            problems.append(f"missing key {key!r} (needed to read the architecture)")
    has_norm, has_fc_norm = "norm.weight" in state, "fc_norm.weight" in state
    if has_norm == has_fc_norm:
        problems.append(
            "expected exactly one of 'norm.weight' and 'fc_norm.weight', found "
            f"{'both' if has_norm else 'neither'}"
        )
    if problems:
        raise CheckpointMismatch("Not a timm ViT state dict", problems)
    patch = np.shape(state["patch_embed.proj.weight"])  # [D, C, p, p]
    if len(patch) != 4 or patch[2] != patch[3]:
        raise CheckpointMismatch(
            "Unsupported timm ViT", [f"patch_embed.proj.weight has shape {patch}, not [D, C, p, p]"]
        )
    embed_dim, in_channels, patch_size = int(patch[0]), int(patch[1]), int(patch[2])
    cls = "cls_token" in state
    tokens = int(np.shape(state["pos_embed"])[1]) - int(cls)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointMismatch(
            "Unsupported timm ViT",
            [f"pos_embed has {tokens} patch entries, not a square grid (no_embed_class, "
             "register tokens or non-square images are not supported)"],
        )
    depth = 1 + max(int(m.group(1)) for k in state if (m := BLOCK_KEY.match(k)))
    hidden = int(np.shape(state["blocks.0.mlp.fc1.weight"])[0])
    if num_heads is None:
        num_heads = HEADS_BY_WIDTH.get(embed_dim)
        if num_heads is None:
            raise ValueError(
                f"A timm state dict does not record the number of heads and width {embed_dim} "
                f"is not one of timm's ViT widths {sorted(HEADS_BY_WIDTH)}: pass num_heads."
            )
    if has_fc_norm and not cls:
        raise CheckpointMismatch(
            "Unsupported timm ViT",
            ["fc_norm without a class token (revjax's pool='avg' keeps timm's class token)"],
        )
    pool = "avg" if has_fc_norm else ("cls" if cls else "mean")
    num_classes = int(np.shape(state["head.weight"])[0]) if "head.weight" in state else 0
    return dict(
        image_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=int(num_heads),
        mlp_ratio=hidden / embed_dim,
        num_classes=num_classes,
        in_channels=in_channels,
        pool=pool,
    )


def timm_shapes(config: Mapping[str, Any], *, with_head: bool) -> dict[str, tuple[int, ...]]:
    """Every key of timm's layout for ``config`` (`timm_config`'s form) and its shape."""
    d, p, c = config["embed_dim"], config["patch_size"], config["in_channels"]
    hidden = int(round(config["mlp_ratio"] * d))
    cls = config["pool"] in ("cls", "avg")
    grid = config["image_size"] // p
    shapes = {
        "patch_embed.proj.weight": (d, c, p, p),
        "patch_embed.proj.bias": (d,),
        "pos_embed": (1, grid * grid + int(cls), d),
    }
    if cls:
        shapes["cls_token"] = (1, 1, d)
    block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,),
    }
    for i in range(config["depth"]):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    norm = "fc_norm" if config["pool"] == "avg" else "norm"
    shapes.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
    if with_head:
        shapes.update(
            {"head.weight": (config["num_classes"], d), "head.bias": (config["num_classes"],)}
        )
    return shapes


def check_layout(state: Mapping[str, Any], config: Mapping[str, Any], what: str) -> None:
    """Raises `CheckpointMismatch` listing unknown keys, missing keys and wrong shapes."""
    expected = timm_shapes(config, with_head="head.weight" in state or "head.bias" in state)
    problems = [f"unknown key {k!r} {tuple(np.shape(state[k]))}" for k in state
                if k not in expected]
    problems += [f"missing key {k!r} {s}" for k, s in expected.items() if k not in state]
    problems += [
        f"{k!r} has shape {tuple(np.shape(state[k]))}, expected {s}"
        for k, s in expected.items()
        if k in state and tuple(np.shape(state[k])) != s
    ]
    if problems:
        raise CheckpointMismatch(
            what, problems,
            "revjax reads timm's plain ViT layout (vit_{tiny,small,base}_patch16_{224,384} and "
            "the same blocks at other sizes); variants with extra parameters are not supported.",
        )


def resample_pos_embed(
    pos: np.ndarray, prefix: int, grid: int, method: str, antialias: bool
) -> np.ndarray:
    """Resizes the patch-grid part of ``pos`` [1, prefix + g*g, D] to ``grid x grid`` as timm
    does (in float32; the ``prefix`` class-token entries are kept)."""
    head, body = pos[:, :prefix], pos[:, prefix:]
    old = math.isqrt(body.shape[1])
    d = body.shape[-1]
    body = jnp.asarray(body.reshape(old, old, d), jnp.float32)
    body = jax.image.resize(body, (grid, grid, d), method=method, antialias=antialias)
    body = np.asarray(body).reshape(1, grid * grid, d).astype(pos.dtype)
    return np.concatenate([head, body], axis=1)


def vit_arch(model: ViT) -> dict[str, Any]:
    """A `ViT`'s architecture in `timm_config`'s form: its options' architecture fields, the
    MLP ratio of the hidden width it has, and its pooling."""
    arch = {name: getattr(model.options, name) for name in model.options.ARCHITECTURE}
    arch["mlp_ratio"] = model.mlp.fc1.kernel.shape[-1] / model.embed_dim
    return {**arch, "pool": model.pool}


def load_vit_weights(
    model: ViT,
    state: Mapping[str, Any],
    *,
    resize: Mapping[str, Any] | None = None,
    source: str = "checkpoint",
) -> ViT:
    """Loads a timm ViT state dict into ``model`` in place (all parameters or none).

    The checkpoint's architecture must be the model's, but for the image size (the position
    embedding is resampled) and the number of classes (the model keeps its own head; said in
    the log, as is a resampling).

    Args:
      model: a `ViT` built with the checkpoint's width, depth, heads, patch size, MLP width,
        channels and pooling.
      state: ``{timm key: array}`` (`read_checkpoint`'s result).
      resize: how to resample the position embedding: ``dict(method=..., antialias=...)`` for
        `jax.image.resize` (default: timm's for state dicts, bicubic with antialiasing).
      source: what to call the checkpoint in messages (a file name).

    Returns:
      ``model``.

    Raises:
      CheckpointMismatch: every difference between the checkpoint and the model.
    """
    if not isinstance(model, ViT):
        raise TypeError(
            f"load_vit_weights loads into a revjax.ViT, got {type(model).__name__}; for a "
            "RevViT load the ViT first and convert it with RevViT.from_vit."
        )
    config = timm_config(state, num_heads=model.num_heads)
    check_layout(state, config, f"{source} is not a consistent timm ViT state dict")
    arch = vit_arch(model)
    problems = [
        f"{k}: checkpoint {config[k]!r}, model {arch[k]!r}"
        for k in ("patch_size", "embed_dim", "depth", "mlp_ratio", "in_channels", "pool")
        if (config[k] != arch[k] if k == "pool" else not np.isclose(config[k], arch[k]))
    ]
    if problems:
        raise CheckpointMismatch(
            f"{source} does not fit this {type(model).__name__}", problems,
            "Build the model with the checkpoint's architecture (revjax.pretrained.load_timm "
            "does that from the file).",
        )
    prefix = int(config["pool"] in ("cls", "avg"))
    pos = np.asarray(state["pos_embed"])
    grid = model.image_size // model.patch_size
    if config["image_size"] != model.image_size:
        how = dict(STATE_DICT_RESIZE if resize is None else resize)
        pos = resample_pos_embed(pos, prefix, grid, how["method"], how["antialias"])
        _log.info(
            "%s: position embedding resampled from %dx%d to %dx%d patches (%s%s).", source,
            config["image_size"] // model.patch_size, config["image_size"] // model.patch_size,
            grid, grid, how["method"], ", antialiased" if how["antialias"] else "",
        )
    flat: dict[tuple, np.ndarray] = {
        ("patch_embed", "conv", "kernel"): np.transpose(
            state["patch_embed.proj.weight"], (2, 3, 1, 0)
        ),
        ("patch_embed", "conv", "bias"): state["patch_embed.proj.bias"],
        ("pos_embed",): pos,
    }
    if prefix:
        flat[("cls_token",)] = state["cls_token"]
    for suffix, (branch, leaf) in BLOCK_LEAVES.items():
        stack = [np.asarray(state[f"blocks.{i}.{suffix}"]) for i in range(model.depth)]
        if suffix.endswith("weight") and leaf[-1] == "kernel":
            stack = [w.T for w in stack]
        flat[(branch, *leaf)] = np.stack(stack)
    norm = "fc_norm" if config["pool"] == "avg" else "norm"
    flat[("norm", "scale")] = state[f"{norm}.weight"]
    flat[("norm", "bias")] = state[f"{norm}.bias"]
    if config["num_classes"] == model.num_classes:
        flat[("head", "kernel")] = np.asarray(state["head.weight"]).T
        flat[("head", "bias")] = state["head.bias"]
    else:
        _log.warning(
            "%s: the checkpoint's head has %d classes, the model %d: the head is not loaded "
            "(it keeps its fresh initialisation).", source, config["num_classes"],
            model.num_classes,
        )
    assign_params(model, flat, source)
    return model


def assign_params(model: nnx.Module, flat: Mapping[tuple, np.ndarray], source: str) -> None:
    """Writes ``flat`` ({parameter path: array}) into ``model``'s Params, cast to their dtype,
    after checking every shape (all or nothing)."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    problems = [f"no parameter {'.'.join(p)} in the model" for p in flat if p not in params]
    problems += [
        f"{'.'.join(p)}: checkpoint shape {tuple(np.shape(v))}, model {params[p].shape}"
        for p, v in flat.items()
        if p in params and tuple(np.shape(v)) != tuple(params[p].shape)
    ]
    if problems:
        raise CheckpointMismatch(f"{source} does not fit this {type(model).__name__}", problems)
    for path, value in flat.items():
        var = params[path]
        var[...] = jnp.asarray(np.asarray(value), dtype=var[...].dtype)


def load_timm(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
    rngs: nnx.Rngs | None = None,
    resize: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> ViT:
    """Builds a `ViT` from a timm ViT checkpoint (a file or a ``{key: array}`` state dict).

    Args:
      source: ``.safetensors`` / ``.pth`` / ``.bin`` file, or a state dict.
      image_size: the model's image side (default: the checkpoint's); another size resamples
        the position embedding as timm does.
      num_classes: the model's classes (default: the checkpoint's); another number keeps a
        freshly initialised head (logged). Required for a checkpoint without a head.
      num_heads: attention heads (default: timm's count for the width).
      rngs: initialisation keys of whatever the checkpoint does not provide (default
        ``nnx.Rngs(0)``).
      resize: position-embedding resampling (`load_vit_weights`).
      **overrides: other `ViT` arguments (dtype, dropout, drop_path_rate, unroll, ...).

    Returns:
      the loaded `ViT`, in evaluation mode (call it with ``train=False``) like any revjax model.
    """
    name, state = read_source(source, "state dict")
    return build_vit(state, name, image_size, num_classes, num_heads, rngs, resize, overrides)


def build_vit(state, name, image_size, num_classes, num_heads, rngs, resize, overrides) -> ViT:
    """A `ViT` with ``state``'s architecture (image size and classes overridable), loaded."""
    config = timm_config(state, num_heads=num_heads)
    if config["num_classes"] == 0 and num_classes is None:
        raise ValueError(f"{name} has no classification head: pass num_classes.")
    arch = dict(config)
    clash = sorted(set(overrides) & set(arch))
    if clash:
        raise ValueError(
            f"{clash} come from the checkpoint ({', '.join(f'{k}={arch[k]!r}' for k in clash)}) "
            "and cannot be overridden; image_size and num_classes are load_timm arguments."
        )
    if image_size is not None:
        arch["image_size"] = image_size
    if num_classes is not None:
        arch["num_classes"] = num_classes
    model = ViT(**arch, **overrides, rngs=nnx.Rngs(0) if rngs is None else rngs)
    return load_vit_weights(model, state, resize=resize, source=name)

