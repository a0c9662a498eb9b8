"""Writing a `revjax.ViT` as a timm state dict (the inverse of
`revjax.pretrained.load_vit_weights`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from revjax.pretrained.timm_layout import BLOCK_LEAVES
from revjax.vit import ViT


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
        return np.array(getattr_path(model, path)[...], dtype=np.float32)  # a writable copy

    out = {
        "patch_embed.proj.weight": np.transpose(get("patch_embed", "conv", "kernel"), (3, 2, 0, 1)),
        "patch_embed.proj.bias": get("patch_embed", "conv", "bias"),
        "pos_embed": get("pos_embed"),
    }
    if model.cls_token is not None:
        out["cls_token"] = get("cls_token")
    for suffix, (branch, leaf) in BLOCK_LEAVES.items():
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


def getattr_path(module: Any, path: tuple[str, ...]) -> Any:
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

