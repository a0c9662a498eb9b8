"""Optimizers and learning-rate schedules: small pure functions, and the registries that map a
`TrainConfig`'s names onto them.

The paper's recipe is `sgd`: momentum 0.9, weight decay added to the gradient before momentum
and applied to conv and dense kernels only, with a `piecewise_constant` learning rate. The
transformer recipe is `adamw` with `with_warmup` around `cosine_decay`; language models also
decay their token and position embeddings (nanoGPT's rule, `weight_decay_mask`).

Schedules are written out rather than taken from optax, whose piecewise and cosine schedules mix
float and int dtypes and so fail under ``jax_numpy_dtype_promotion="strict"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from revjax import finetune

if TYPE_CHECKING:
    from revjax.train.config import TrainConfig

__all__ = [
    "DECAYED_LEAVES",
    "KERNELS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "WARMUP_OFFSETS",
    "adamw",
    "config_decay_mask",
    "cosine_decay",
    "decayed_leaves",
    "learning_rate_schedule",
    "make_optimizer",
    "piecewise_constant",
    "sgd",
    "warmup_schedule",
    "weight_decay_mask",
    "with_warmup",
]


#: The leaves weight decay applies to, by their last name: conv and dense kernels for image
#: models (the paper's recipe; timm / DeiT leave biases, norms, position embeddings and class
#: tokens alone).
KERNELS: tuple[str, ...] = ("kernel",)

#: Model families (class names; subclasses follow their base) that decay more than `KERNELS`.
#: Language models decay what nanoGPT decays, every matrix of the model: the linear layers'
#: kernels and the token and position embeddings (the token embedding is also the tied output
#: head). Their blocks' weights are stacked on a depth axis, so a rank rule (``ndim >= 2``)
#: would also decay the biases and norm scales; the names decide.
DECAYED_LEAVES: dict[str, tuple[str, ...]] = {
    "GPT": ("kernel", "embedding", "pos_embed"),
    "RevGPT": ("kernel", "embedding", "pos_embed"),
}


def decayed_leaves(model: Any = None) -> tuple[str, ...]:
    """The leaf names weight decay applies to for ``model`` (a `revjax.presets` name, a model
    class or module; ``None``: an image model): `DECAYED_LEAVES` of its family, else
    `KERNELS`."""
    if model is None:
        return KERNELS
    from revjax import presets

    return presets.family_entry(model, DECAYED_LEAVES) or KERNELS


def weight_decay_mask(params: Any, model: Any = None) -> Any:
    """True for the leaves of ``params`` that weight decay applies to, False for the others.

    Image models (``model`` None or an image preset / class): conv and dense kernels (leaves
    named ``kernel``); not BatchNorm / LayerNorm scales and biases, dense biases, position
    embeddings or class tokens. Language models (``model`` a `revjax.GPT` / `revjax.RevGPT`
    preset name, class or module): also the token embedding (``embedding``, the tied head) and
    the position embedding (``pos_embed``), as nanoGPT (`decayed_leaves`).
    """
    decayed = decayed_leaves(model)

    def is_decayed(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n != "value"]
        return bool(names) and names[-1] in decayed

    return jax.tree_util.tree_map_with_path(is_decayed, params)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def piecewise_constant(learning_rate: float, boundaries: Sequence[int],
                       decay: float) -> optax.Schedule:
    """``learning_rate * decay**k`` from the k-th boundary (a step number) on."""
    boundaries = sorted(int(b) for b in boundaries)
    values = [learning_rate * decay**k for k in range(len(boundaries) + 1)]

    def schedule(count):
        if not boundaries:
            return jnp.asarray(values[0], jnp.float32)
        passed = jnp.sum(jnp.asarray(count, jnp.int32) >= jnp.asarray(boundaries, jnp.int32))
        return jnp.asarray(values, jnp.float32)[passed]

    return schedule


def cosine_decay(peak: float, end: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
    """``end + (peak - end) * (1 + cos(pi * s)) / 2`` with ``s = (t - warmup_steps) /
    (num_steps - warmup_steps)`` clipped to [0, 1]: with `with_warmup`, the values of
    `optax.warmup_cosine_decay_schedule` (init 0, ``decay_steps=num_steps``)."""
    warmup, peak, end = int(warmup_steps), float(peak), float(end)
    span = float(max(num_steps - warmup, 1))

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        s = jnp.clip((count.astype(jnp.float32) - float(warmup)) / span, 0.0, 1.0)
        return jnp.asarray(end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * s)), jnp.float32)

    return schedule


#: The warmup ramps `TrainConfig.warmup_start` names, as the offset ``k`` of `with_warmup`'s
#: factor ``min((t + k) / (warmup_steps + k), 1)`` at step ``t`` (counted from 0): ``"zero"``
#: starts at 0 (optax's `optax.warmup_cosine_decay_schedule`), ``"nanogpt"`` one ramp step
#: above it, ``1 / (warmup_steps + 1)`` of the rate at step 0 (nanoGPT's train.py ``get_lr``).
#: Both reach the full rate at step ``warmup_steps``.
WARMUP_OFFSETS: dict[str, int] = {"zero": 0, "nanogpt": 1}


def with_warmup(base: optax.Schedule, warmup_steps: int, start: str = "zero") -> optax.Schedule:
    """``base(t) * min((t + k) / (warmup_steps + k), 1)``: a linear warmup over the first
    ``warmup_steps`` steps, from 0 (``start="zero"``, ``k = 0``) or from ``1 / (warmup_steps +
    1)`` (``start="nanogpt"``, ``k = 1``; `WARMUP_OFFSETS`); ``base`` itself when
    ``warmup_steps`` is 0."""
    if start not in WARMUP_OFFSETS:
        raise ValueError(f"start={start!r} is not a warmup start: expected one of "
                         f"{', '.join(map(repr, WARMUP_OFFSETS))}")
    warmup, offset = int(warmup_steps), WARMUP_OFFSETS[start]
    if not warmup:
        return base

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        lr = jnp.asarray(base(count), jnp.float32)
        ramp = (count.astype(jnp.float32) + float(offset)) / float(warmup + offset)
        return lr * jnp.minimum(ramp, 1.0)

    return schedule


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float, weight_decay: float,
        mask: Callable[[Any], Any] = weight_decay_mask) -> optax.GradientTransformation:
    """SGD + momentum with weight decay on the leaves ``mask`` selects (default: kernels,
    `weight_decay_mask`) added to the gradient before momentum."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.sgd(learning_rate, momentum=momentum),
    )


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``tx.update`` under standard dtype promotion.

    optax's Adam bias correction computes ``b1 ** count`` (a Python float and an int32 count),
    which ``jax_numpy_dtype_promotion="strict"`` (the test suite's setting) rejects.
    """

    def update(updates, state, params=None, **extra):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra)

    return optax.GradientTransformation(tx.init, update)


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float, b2: float, eps: float,
          weight_decay: float,
          mask: Callable[[Any], Any] = weight_decay_mask) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on the leaves ``mask`` selects.

    ``w -= lr_t * (adam_update + weight_decay * w)`` for those leaves. The default mask
    (`weight_decay_mask` of an image model) decays conv and dense kernels only: biases,
    LayerNorm / BatchNorm scales and offsets, position embeddings and class tokens are not
    decayed, as in timm / DeiT. A language model's mask (``weight_decay_mask(params, model)``)
    also decays the token and position embeddings, as nanoGPT.
    """
    return _standard_promotion(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=mask)
    )


# --------------------------------------------------------------------------------------------
# A config's optimizer and schedule: one entry per name of `revjax.train.config.OPTIMIZER_NAMES`
# and `LR_SCHEDULE_NAMES` (the names `TrainConfig.optimizer` and `lr_schedule` accept).
# --------------------------------------------------------------------------------------------

LR_SCHEDULES: dict[str, Callable[[TrainConfig], optax.Schedule]] = {
    "piecewise": lambda c: piecewise_constant(c.learning_rate, c.lr_boundaries, c.lr_decay),
    "cosine": lambda c: cosine_decay(c.learning_rate, c.end_learning_rate, c.warmup_steps,
                                     c.num_steps),
}

OPTIMIZERS: dict[str, Callable[[TrainConfig, optax.Schedule], optax.GradientTransformation]] = {
    "sgd": lambda c, lr: sgd(lr, momentum=c.momentum, weight_decay=c.weight_decay,
                             mask=config_decay_mask(c)),
    "adamw": lambda c, lr: adamw(lr, b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps,
                                 weight_decay=c.weight_decay, mask=config_decay_mask(c)),
}


def config_decay_mask(config: TrainConfig) -> Callable[[Any], Any]:
    """The weight-decay mask of ``config``'s model: `weight_decay_mask` for its preset."""
    return functools.partial(weight_decay_mask, model=config.model)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """The learning rate of ``config`` by step: ``lr_schedule`` (``"piecewise"``:
    ``learning_rate * lr_decay**k`` from the k-th of ``lr_boundaries`` on; ``"cosine"``:
    `cosine_decay` to ``end_learning_rate`` at ``num_steps``), after a linear warmup over
    ``warmup_steps`` from ``warmup_start`` (`with_warmup`)."""
    return with_warmup(LR_SCHEDULES[config.lr_schedule](config), config.warmup_steps,
                       config.warmup_start)


def warmup_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup over ``warmup_steps``, then the piecewise or the cosine schedule: the
    schedule `learning_rate_schedule` returns."""
    return learning_rate_schedule(config)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optimizer of ``config``: `sgd` or `adamw` on `learning_rate_schedule`, weight decay
    on the leaves `weight_decay_mask` selects for ``config.model`` (kernels; a language model's
    embeddings too).

    With ``grad_clip_norm``: the gradient is first clipped to that global norm
    (`optax.clip_by_global_norm`), before weight decay and momentum.
    """
    tx = OPTIMIZERS[config.optimizer](config, learning_rate_schedule(config))
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    # Fine-tuning: scale whole updates (weight decay included), then zero the frozen ones.
    if config.layer_decay is not None:
        tx = optax.chain(tx, finetune.scale_by_layer_decay(config.layer_decay))
    if config.freeze:
        tx = optax.chain(tx, finetune.freeze(config.freeze))
    return tx
