"""Checkpoint files: reading ``.safetensors``, ``.npz`` and torch files without running their
code, and the error every mismatch between a checkpoint and a model raises."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model; ``differences`` lists every problem found."""

    def __init__(self, what: str, differences: list[str], fix: str = ""):
        self.differences = list(differences)
        lines = "\n".join(f"  - {d}" for d in self.differences)
        super().__init__(
            f"{what}: {len(self.differences)} difference(s), nothing was loaded:\n{lines}"
            + (f"\n{fix}" if fix else "")
        )




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
                "pip install safetensors (in a revjax checkout: pip install -e '.[pretrained]')."
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
        return read_torch(path)
    raise ValueError(
        f"Unknown checkpoint format {suffix!r} ({path}): use .safetensors (timm state dict), "
        ".pth / .pt / .bin (a torch state dict, needs torch) or .npz (big_vision / AugReg)."
    )


def read_source(source: str | os.PathLike | Mapping[str, Any], what: str) -> tuple[str, dict]:
    """A checkpoint given as a file or as arrays: its name in messages (the path, or ``what``
    for arrays) and its flat ``{key: array}`` (`read_checkpoint`'s for a file)."""
    if isinstance(source, Mapping):
        return what, dict(source)
    return os.fspath(source), read_checkpoint(source)


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A torch state dict file as numpy arrays, read with ``torch.load(weights_only=True)``
    (bfloat16 widened to float32: numpy has no bfloat16)."""
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


