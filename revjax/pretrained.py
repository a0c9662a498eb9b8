"""Pretrained ViTs: timm state dicts and big_vision / AugReg ``.npz`` files into `ViT`, and back.

timm's ``vit_{tiny,small,base}_patch16_{224,384}`` compute the same function as `revjax.ViT`
(pre-LN blocks, LayerNorm epsilon 1e-6, exact GELU, one fused qkv projection); only the
parameter layouts differ:

==============================  =================================  =============================
timm key                        revjax parameter                   conversion
==============================  =================================  =============================
``patch_embed.proj.weight``     ``patch_embed.conv.kernel``        OIHW -> HWIO
``cls_token``, ``pos_embed``    ``cls_token``, ``pos_embed``       (pos_embed resampled, below)
``blocks.i.norm1.*``            ``attn.norm.{scale,bias}[i]``
``blocks.i.attn.qkv.*``         ``attn.qkv.{kernel,bias}[i]``      transposed; rows [q; k; v],
                                                                   each heads x head_dim
``blocks.i.attn.proj.*``        ``attn.proj.*[i]``                 transposed
``blocks.i.norm2.*``            ``mlp.norm.*[i]``
``blocks.i.mlp.fc{1,2}.*``      ``mlp.fc{1,2}.*[i]``               transposed
``norm.*`` / ``fc_norm.*``      ``norm.*``                         ``fc_norm``: pool ``"avg"``
``head.*``                      ``head.*``                         transposed
==============================  =================================  =============================

Pooling follows from the keys: a class token with ``norm`` is timm's ``global_pool="token"``
(revjax ``pool="cls"``), a class token with ``fc_norm`` is ``global_pool="avg"`` (``pool="avg"``),
no class token with ``norm`` is ``global_pool="avg", fc_norm=False`` (``pool="mean"``).

When the model's image size differs from the checkpoint's, the position embedding of the patch
grid is resampled as timm does (the class token's entry is kept): bicubic with antialiasing for
state dicts, bilinear without for ``.npz`` files (timm's ``checkpoint_filter_fn`` and
``_load_weights``). A head of another size is not loaded: the model keeps its freshly
initialised head, and the log says so.

Loading never runs code from a file: ``.safetensors`` through the safetensors numpy API (no
torch), ``.npz`` with ``allow_pickle=False``, ``.pth`` / ``.bin`` / ``.pt`` only through
``torch.load(weights_only=True)``. Any mismatch (an unknown or missing key, a wrong shape, an
architecture the model cannot express) raises one `CheckpointMismatch` that lists every
difference; nothing is loaded then.
"""

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

from revjax.vit import ViT

_log = logging.getLogger(__name__)

__all__ = [
    "CheckpointMismatch",
    "TIMM_VARIANTS",
    "load_big_vision",
    "load_timm",
    "load_vit_weights",
    "read_checkpoint",
    "save_timm",
    "timm_config",
    "timm_state_dict",
    "timm_state_from_big_vision",
]

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
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}

# timm's resampling of the position embedding, per file kind.
_STATE_DICT_RESIZE = dict(method="bicubic", antialias=True)
_NPZ_RESIZE = dict(method="linear", antialias=False)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")

# Per block: timm suffix -> (revjax branch, revjax leaf path). Linear weights are transposed.
_BLOCK_LEAVES = {
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


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model; ``differences`` lists every problem found."""

    def __init__(self, what: str, differences: list[str], fix: str = ""):
        self.differences = list(differences)
        lines = "\n".join(f"  - {d}" for d in self.differences)
        super().__init__(
            f"{what}: {len(self.differences)} difference(s), nothing was loaded:\n{lines}"
            + (f"\n{fix}" if fix else "")
        )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into a flat ``{key: numpy array}`` without running its code.

    ``.safetensors``: safetensors' numpy API (needs the ``safetensors`` package, not torch).
    ``.npz``: `numpy.load` with ``allow_pickle=False``. ``.pth`` / ``.pt`` / ``.bin``:
    ``torch.load(weights_only=True)`` (needs torch); a ``{"state_dict": ...}``, ``"model"`` or
    ``"state_dict_ema"`` wrapper is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ImportError(
                "Reading .safetensors needs the safetensors package (no torch): "
                "pip install safetensors (or revjax[pretrained])."
            ) from err
        try:
            return dict(load_file(path))
        except TypeError:  # numpy has no bfloat16: read through JAX's (ml_dtypes) instead
            from safetensors import safe_open

            with safe_open(path, framework="flax") as f:
                return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    if suffix in (".pth", ".pt", ".bin"):
        return _read_torch(path)
    raise ValueError(
        f"Unknown checkpoint format {suffix!r} ({path}): use .safetensors (timm state dict), "
        ".pth / .pt / .bin (a torch state dict, needs torch) or .npz (big_vision / AugReg)."
    )


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{path} is a torch file: reading it needs torch. Convert it to .safetensors "
            "where torch is installed (safetensors.torch.save_file), which revjax reads "
            "without torch."
        ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError and others for disallowed globals
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) (it needs more than "
            f"tensors: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "revjax never unpickles arbitrary objects; save the state dict as .safetensors "
            "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))."
        ) from err
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    out, bad = {}, []
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key}: {type(value).__name__}, not a tensor")
            continue
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.numpy()
    if bad:
        raise CheckpointMismatch(f"{path}", bad, "A state dict maps names to tensors only.")
    return out


# --------------------------------------------------------------------------------------------
# timm layout
# --------------------------------------------------------------------------------------------


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
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    hidden = int(np.shape(state["blocks.0.mlp.fc1.weight"])[0])
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(embed_dim)
        if num_heads is None:
            raise ValueError(
                f"A timm state dict does not record the number of heads and width {embed_dim} "
                f"is not one of timm's ViT widths {sorted(_HEADS_BY_WIDTH)}: pass num_heads."
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


def _timm_shapes(config: Mapping[str, Any], *, with_head: bool) -> dict[str, tuple[int, ...]]:
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


def _check_layout(state: Mapping[str, Any], config: Mapping[str, Any], what: str) -> None:
    """Raises `CheckpointMismatch` listing unknown keys, missing keys and wrong shapes."""
    expected = _timm_shapes(config, with_head="head.weight" in state or "head.bias" in state)
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


def _resample_pos_embed(
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


def _vit_arch(model: ViT) -> dict[str, Any]:
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
    _check_layout(state, config, f"{source} is not a consistent timm ViT state dict")
    arch = _vit_arch(model)
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
        how = dict(_STATE_DICT_RESIZE if resize is None else resize)
        pos = _resample_pos_embed(pos, prefix, grid, how["method"], how["antialias"])
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
    for suffix, (branch, leaf) in _BLOCK_LEAVES.items():
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
    _assign(model, flat, source)
    return model


def _assign(model: nnx.Module, flat: Mapping[tuple, np.ndarray], source: str) -> None:
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
    name = os.fspath(source) if not isinstance(source, Mapping) else "state dict"
    state = read_checkpoint(source) if not isinstance(source, Mapping) else dict(source)
    return _build_vit(state, name, image_size, num_classes, num_heads, rngs, resize, overrides)


def _build_vit(state, name, image_size, num_classes, num_heads, rngs, resize, overrides) -> ViT:
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


def timm_state_dict(model: ViT) -> dict[str, np.ndarray]:
    """The timm state dict of a `ViT` (float32 numpy arrays), the inverse of `load_vit_weights`.

    ``pool="cls"`` is timm's default ``global_pool="token"``; ``pool="avg"`` is
    ``global_pool="avg"`` (``fc_norm``); ``pool="mean"`` is ``class_token=False,
    global_pool="avg", fc_norm=False``.
    """
    if not isinstance(model, ViT):
        raise TypeError(
            f"timm_state_dict exports a revjax.ViT, got {type(model).__name__}: timm has no "
            "reversible ViT."
        )

    def get(*path):
        return np.array(_getattr_path(model, path)[...], dtype=np.float32)  # a writable copy

    out = {
        "patch_embed.proj.weight": np.transpose(get("patch_embed", "conv", "kernel"), (3, 2, 0, 1)),
        "patch_embed.proj.bias": get("patch_embed", "conv", "bias"),
        "pos_embed": get("pos_embed"),
    }
    if model.cls_token is not None:
        out["cls_token"] = get("cls_token")
    for suffix, (branch, leaf) in _BLOCK_LEAVES.items():
        stack = get(branch, *leaf)
        for i in range(model.depth):
            w = stack[i]
            out[f"blocks.{i}.{suffix}"] = w.T if leaf[-1] == "kernel" else w
    norm = "fc_norm" if model.pool == "avg" else "norm"
    out[f"{norm}.weight"] = get("norm", "scale")
    out[f"{norm}.bias"] = get("norm", "bias")
    out["head.weight"] = get("head", "kernel").T
    out["head.bias"] = get("head", "bias")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}  # transposes: contiguous copies


def _getattr_path(module: Any, path: tuple[str, ...]) -> Any:
    """``module.a.b.c`` for ``path = ("a", "b", "c")``."""
    for name in path:
        module = getattr(module, name)
    return module


def save_timm(model: ViT, path: str | os.PathLike) -> str:
    """Writes `timm_state_dict(model)` to ``path`` (``.safetensors``), loadable by timm with
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))`` or
    ``model.load_state_dict(safetensors.torch.load_file(path))``. Returns the path."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_timm writes .safetensors files; got {path!r}.")
    from safetensors.numpy import save_file

    save_file(timm_state_dict(model), path, metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------
# big_vision / AugReg .npz
# --------------------------------------------------------------------------------------------

_NPZ_PREFIXES = ("opt/target/", "params/img/", "params/")


def timm_state_from_big_vision(npz: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Renames a big_vision / AugReg ViT ``.npz`` to timm's state-dict layout (as timm's own
    ``_load_weights`` reads it).

    Two layouts are read, with an optional ``opt/target/``, ``params/`` or ``params/img/``
    prefix (keys outside the prefix, such as optimiser state, are ignored):

    * AugReg / google-research/vision_transformer: ``Transformer/encoderblock_{i}/`` with
      ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``;
      ``Transformer/posembed_input/pos_embedding`` includes the class token's entry.
    * big_vision: ``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``,
      ``MlpBlock_0`` per block, either ``encoderblock_{i}`` or one scanned ``encoderblock``
      with a leading depth axis; ``pos_embedding`` at the top covers the patches only (a
      class token, ``pool_type="tok"``, gets no position entry: it is given a zero one).

    Attention kernels are ``[D, heads, head_dim]`` (query, key, value) and
    ``[heads, head_dim, D]`` (out). MAP heads and representation layers (``pre_logits``) are
    not supported: they are listed as unknown keys.
    """
    prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in npz), "")
    w = {k[len(prefix):]: np.asarray(v) for k, v in npz.items() if k.startswith(prefix)}
    used: set[str] = set()
    missing: list[str] = []

    def take(key):
        if key not in w:
            missing.append(repr(prefix + key))
            return None
        used.add(key)
        return w[key]

    big_vision = "pos_embedding" in w or "Transformer/encoderblock/LayerNorm_0/scale" in w
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    mha, ln2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
    out: dict[str, np.ndarray] = {}
    kernel = take("embedding/kernel")  # [p, p, C, D]
    out["patch_embed.proj.weight"] = None if kernel is None else kernel.transpose(3, 2, 0, 1)
    out["patch_embed.proj.bias"] = take("embedding/bias")
    if "cls" in w:
        out["cls_token"] = take("cls")
    pos = take("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding")
    if pos is not None and pos.ndim == 2:
        pos = pos[None]
    if pos is not None and big_vision and "cls" in w:
        pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    out["pos_embed"] = pos
    if scanned:
        depth = int(w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
    else:
        block_key = re.compile(r"Transformer/encoderblock_(\d+)/")
        found = [int(m.group(1)) for k in w if (m := block_key.match(k))]
        depth = 1 + max(found, default=-1)
    for i in range(depth):
        base = "Transformer/encoderblock/" if scanned else f"Transformer/encoderblock_{i}/"

        def block(key, i=i, base=base):
            value = take(base + key)
            return None if value is None else (value[i] if scanned else value)

        att = f"MultiHeadDotProductAttention_{mha}/"
        q, k, v = (block(f"{att}{n}/kernel") for n in ("query", "key", "value"))
        qb, kb, vb = (block(f"{att}{n}/bias") for n in ("query", "key", "value"))
        o, ob = block(f"{att}out/kernel"), block(f"{att}out/bias")
        p = f"blocks.{i}."
        out[p + "norm1.weight"] = block("LayerNorm_0/scale")
        out[p + "norm1.bias"] = block("LayerNorm_0/bias")
        if all(t is not None for t in (q, k, v)):
            out[p + "attn.qkv.weight"] = np.concatenate(
                [t.reshape(t.shape[0], -1).T for t in (q, k, v)], axis=0
            )  # [3D, D], rows [q; k; v], each heads x head_dim
        if all(t is not None for t in (qb, kb, vb)):
            out[p + "attn.qkv.bias"] = np.concatenate([t.reshape(-1) for t in (qb, kb, vb)])
        if o is not None:
            out[p + "attn.proj.weight"] = o.reshape(-1, o.shape[-1]).T  # [heads*hd, D] -> [D, D]
        out[p + "attn.proj.bias"] = ob
        out[p + "norm2.weight"] = block(f"LayerNorm_{ln2}/scale")
        out[p + "norm2.bias"] = block(f"LayerNorm_{ln2}/bias")
        for r in (0, 1):
            dense = block(f"MlpBlock_{mlp}/Dense_{r}/kernel")
            out[p + f"mlp.fc{r + 1}.weight"] = None if dense is None else dense.T
            out[p + f"mlp.fc{r + 1}.bias"] = block(f"MlpBlock_{mlp}/Dense_{r}/bias")
    out["norm.weight"] = take("Transformer/encoder_norm/scale")
    out["norm.bias"] = take("Transformer/encoder_norm/bias")
    if "head/kernel" in w or "head/bias" in w:
        head = take("head/kernel")
        out["head.weight"] = None if head is None else head.T
        out["head.bias"] = take("head/bias")
    unknown = [f"unknown key {prefix + k!r} {w[k].shape}" for k in w if k not in used]
    if missing or unknown or depth == 0:
        problems = [f"missing key {k}" for k in missing] + unknown
        if depth == 0:
            problems.append("no Transformer/encoderblock_{i} or scanned encoderblock found")
        raise CheckpointMismatch(
            "Not a big_vision / AugReg ViT checkpoint revjax can read", problems,
            "revjax reads plain ViTs with a class token ('tok') or average pooling ('gap'); "
            "MAP heads and representation layers are not supported.",
        )
    return {k: v for k, v in out.items() if v is not None}


def load_big_vision(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
    rngs: nnx.Rngs | None = None,
    **overrides: Any,
) -> ViT:
    """Builds a `ViT` from a big_vision / AugReg ``.npz`` checkpoint (`timm_state_from_big_vision`).

    Arguments as `load_timm`; the position embedding is resampled bilinearly without
    antialiasing, as timm does for these files. A class-token model becomes ``pool="cls"``,
    a ``gap`` model ``pool="mean"`` (big_vision normalises before averaging).
    """
    name = os.fspath(source) if not isinstance(source, Mapping) else "npz arrays"
    npz = read_checkpoint(source) if not isinstance(source, Mapping) else source
    state = timm_state_from_big_vision(npz)
    return _build_vit(state, name, image_size, num_classes, num_heads, rngs, _NPZ_RESIZE, overrides)
