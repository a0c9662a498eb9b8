"""Fine-tuning options for the vision transformers: initial weights from a file, layer-wise
learning-rate decay, frozen parts, a new head.

Pure functions on parameter pytrees (the ``nnx.State`` of a model's Params, or any pytree
with the same names) and optax transformations built from them, so the trainer and a
hand-written loop use the same code:

* `init_from` loads a timm / big_vision checkpoint into a `ViT`, or into a `RevViT` through
  `RevViT.from_vit`; a head of another size keeps its fresh initialisation (a new head). A
  GPT-2 checkpoint loads into a `GPT`, or into a `RevGPT` through `RevGPT.from_gpt`.
* `layer_decay_scales` / `scale_by_layer_decay`: block ``i`` of ``depth`` learns at
  ``decay ** (depth - i)`` times the rate of the head and final norm, the embeddings at
  ``decay ** (depth + 1)`` (BEiT, Bao et al. 2022; timm's ``layer_decay``). Chained after the
  optimiser, it scales the whole update, decoupled weight decay included, as a per-parameter
  learning rate does.
* `freeze_mask` / `freeze`: zero updates of named parts (``"embed"``: patch embedding,
  position embedding and class token), so they keep their loaded values.
* `fit` / `accuracy`: a minimal optax loop over in-memory arrays and its test accuracy, for
  notebooks and small experiments (the trainer, `revjax.train`, is the full one).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from revjax.gpt import GPT, RevGPT
from revjax.vit import RevViT, ViT, ViTOptions

__all__ = [
    "EMBEDDING",
    "accuracy",
    "fit",
    "freeze",
    "freeze_mask",
    "init_from",
    "layer_decay_scales",
    "scale_by_layer_decay",
]

# The embedding parameters of the vision transformers: the "embed" part and layer 0.
EMBEDDING = ("patch_embed", "pos_embed", "cls_token")
# Where the stacked blocks live: ViT (attention, MLP) and RevViT (F, G).
_BLOCK_PREFIXES = (("attn",), ("mlp",), ("blocks", "f"), ("blocks", "g"))


def _names(path) -> tuple[str, ...]:
    """Attribute / key names of a pytree path (NNX's ``value`` leaf name dropped)."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
    return tuple(str(n) for n in names if n is not None and n != "value")


def _is_block(names: tuple[str, ...]) -> bool:
    return any(names[: len(p)] == p for p in _BLOCK_PREFIXES)


def layer_decay_scales(params: Any, decay: float) -> Any:
    """Per-parameter learning-rate factors for layer-wise decay (a pytree like ``params``).

    Leaves of the stacked blocks (``attn`` / ``mlp`` of a `ViT`, ``blocks.f`` / ``blocks.g``
    of a `RevViT`; leading axis = depth) get an array ``[depth, 1, ...]`` of factors
    ``decay ** (depth - i)``; the embeddings (`EMBEDDING`) ``decay ** (depth + 1)``; everything
    else (final norm, head) 1.

    Raises:
      ValueError: ``decay`` outside (0, 1], or no stacked blocks in ``params``.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must lie in (0, 1], got {decay!r} (1 turns it off).")
    leaves = jax.tree_util.tree_leaves_with_path(params)
    depths = {jnp.shape(leaf)[0] for path, leaf in leaves if _is_block(_names(path))}
    if len(depths) != 1:
        raise ValueError(
            "Layer-wise learning-rate decay is defined for revjax.ViT / revjax.RevViT "
            "parameters (blocks stacked under attn/mlp or blocks.f/blocks.g); "
            + ("none were found." if not depths else f"found block depths {sorted(depths)}.")
        )
    (depth,) = depths

    def scale(path, leaf):
        names = _names(path)
        dtype = jnp.result_type(leaf) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) \
            else jnp.float32
        if _is_block(names):
            factors = decay ** (depth - jnp.arange(depth, dtype=jnp.float32))
            return factors.astype(dtype).reshape((depth,) + (1,) * (jnp.ndim(leaf) - 1))
        if names and names[0] in EMBEDDING:
            return jnp.asarray(decay ** (depth + 1), dtype)
        return jnp.asarray(1.0, dtype)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
    """Multiplies each update by its `layer_decay_scales` factor (stateless).

    Chain it after the optimiser: ``optax.chain(optax.adamw(...), scale_by_layer_decay(0.75))``.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must lie in (0, 1], got {decay!r} (1 turns it off).")

    def init(params):
        layer_decay_scales(params, decay)  # fail early on a model without blocks
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scales = layer_decay_scales(updates, decay)
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def freeze_mask(params: Any, parts: Iterable[str]) -> Any:
    """True for the leaves of ``params`` under a frozen part, False elsewhere.

    A part is a top-level name (``"patch_embed"``, ``"head"``, ``"norm"``, ``"blocks"``,
    ``"attn"``, ...) or ``"embed"``, standing for `EMBEDDING`.

    Raises:
      ValueError: a part that names nothing in ``params`` (the message lists the names).
    """
    parts = tuple(parts)
    wanted = set()
    for part in parts:
        wanted.update(EMBEDDING if part == "embed" else (part,))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    top = sorted({_names(path)[0] for path, _ in leaves if _names(path)})
    unknown = [p for p in parts if not (set(EMBEDDING if p == "embed" else (p,)) & set(top))]
    if unknown:
        raise ValueError(
            f"Cannot freeze {unknown}: no such part in the model. Parts: {top} and 'embed' "
            f"({', '.join(EMBEDDING)})."
        )
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(_names(path)) and _names(path)[0] in wanted, params
    )


def freeze(parts: Iterable[str]) -> optax.GradientTransformation:
    """Zeroes the updates of the named parts (`freeze_mask`); chain it last, after weight
    decay, so a frozen parameter does not move at all."""
    parts = tuple(parts)
    return optax.masked(optax.set_to_zero(), lambda params: freeze_mask(params, parts))


def init_from(
    model: ViT | RevViT | GPT | RevGPT,
    path: str | os.PathLike | Mapping[str, Any],
    *,
    num_heads: int | None = None,
) -> ViT | RevViT | GPT | RevGPT:
    """Loads a pretrained ViT checkpoint into ``model`` in place and returns it.

    A `GPT` or `RevGPT` ``model`` takes a Hugging Face GPT-2 checkpoint instead (its
    ``model.safetensors`` path; `revjax.pretrained.load_gpt2_weights`), of the model's
    architecture and vocabulary.

    Args:
      model: a `ViT` (loaded as it is) or a `RevViT` (the checkpoint's ViT is converted with
        `RevViT.from_vit`). Its architecture must be the checkpoint's but for the image size
        (the position embedding is resampled) and the number of classes (a new head: the
        model's own initialisation is kept, and the log says so).
      path: ``.safetensors`` / ``.pth`` / ``.bin`` (timm) or ``.npz`` (big_vision / AugReg),
        or a timm state dict.
      num_heads: the checkpoint's heads (default: the model's).

    Raises:
      revjax.pretrained.CheckpointMismatch: every difference, nothing loaded.
    """
    from revjax import pretrained

    if isinstance(model, GPT | RevGPT):
        if isinstance(path, Mapping):
            raise TypeError("A GPT / RevGPT loads a GPT-2 checkpoint from its path "
                            "(model.safetensors with config.json beside it), not a state dict.")
        return pretrained.load_gpt2_weights(model, path)
    if not isinstance(path, Mapping) and os.fspath(path).lower().endswith(".npz"):
        state = pretrained.timm_state_from_big_vision(pretrained.read_checkpoint(path))
        resize = dict(method="linear", antialias=False)
    else:
        state = dict(path) if isinstance(path, Mapping) else pretrained.read_checkpoint(path)
        resize = None
    source = "state dict" if isinstance(path, Mapping) else os.fspath(path)
    heads = model.num_heads if num_heads is None else num_heads
    if isinstance(model, ViT):
        return pretrained.load_vit_weights(model, state, resize=resize, source=source)
    if not isinstance(model, RevViT):
        raise TypeError(
            f"init_from loads ViT checkpoints into revjax.ViT or revjax.RevViT, got "
            f"{type(model).__name__}."
        )
    config = pretrained.timm_config(state, num_heads=heads)
    # A ViT with the model's architecture, to carry the checkpoint's weights to from_vit.
    options = ViTOptions.like(model.options, num_heads=heads, pool=config["pool"])
    vit = ViT(options=options, rngs=nnx.Rngs(0))
    pretrained.load_vit_weights(vit, state, resize=resize, source=source)
    converted = RevViT.from_vit(vit)
    loaded = nnx.state(converted, nnx.Param)
    if config["num_classes"] != model.num_classes:  # a new head: keep the model's own
        loaded = nnx.filter_state(loaded, nnx.Not(nnx.PathContains("head")))
    nnx.update(model, loaded)
    return model


def fit(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch: int,
    seed: int = 0,
) -> nnx.Module:
    """Trains ``model`` in place on images ``x`` and integer labels ``y`` with ``tx`` (softmax
    cross-entropy, ``steps`` batches of ``batch`` examples drawn with replacement, seeded);
    returns it. Every non-Param variable stays as it is (the model runs with ``train=False``)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(xb, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        params, opt_state, _ = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    nnx.update(model, params)
    return model


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of ``x`` whose largest logit is at its label ``y`` (one batch)."""
    logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y))
