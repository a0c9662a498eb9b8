"""big_vision / AugReg ViT ``.npz`` checkpoints: renamed to timm's layout, then loaded as timm
state dicts are."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from revjax.pretrained.checkpoint_files import CheckpointMismatch, read_source
from revjax.pretrained.timm_layout import build_vit
from revjax.vit import ViT

# timm's resampling of the position embedding for these files (`_load_weights`).
NPZ_RESIZE = dict(method="linear", antialias=False)

NPZ_PREFIXES = ("opt/target/", "params/img/", "params/")


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
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in npz), "")
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
    name, npz = read_source(source, "npz arrays")
    state = timm_state_from_big_vision(npz)
    return build_vit(state, name, image_size, num_classes, num_heads, rngs, NPZ_RESIZE, overrides)
