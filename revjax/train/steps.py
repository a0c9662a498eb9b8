"""The model, the train state, and the pure train and evaluation steps.

The NNX graph is split once (`create_train_state`): the steps work on pure pytrees, so they can
be jitted, sharded and donated like any JAX function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from revjax import finetune, presets  # presets: filled by revjax.models and revjax.vit
from revjax._lm_loss import cross_entropy as cross_entropy
from revjax.layers import RebuildMismatches, add_rebuild_counts
from revjax.train.optim import make_optimizer

if TYPE_CHECKING:
    from revjax.train.config import TrainConfig

__all__ = [
    "TrainState",
    "abstract_train_state",
    "abstract_train_step",
    "build_model",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "make_eval_step",
    "make_train_step",
    "step_options",
]


@struct.dataclass
class TrainState:
    """Pure pytree of everything a step changes."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState



def build_model(name: str, overrides: Mapping[str, Any], num_classes: int, in_channels: int,
                seed: int) -> nnx.Module:
    """Builds the `revjax.presets` model called ``name``.

    Raises:
      ValueError: an unknown name (with the closest known names).
    """
    overrides = dict(overrides)
    if presets.get(name).accepts("in_channels"):  # image models; a language model reads tokens
        overrides.setdefault("in_channels", in_channels)
    return presets.build(name, num_classes, rngs=nnx.Rngs(seed), **overrides)


def _model_overrides(config: TrainConfig) -> dict[str, Any]:
    """``model_overrides`` plus what other options imply: the compute dtype (reversible models
    keep float32 streams) and a transformer's image size."""
    overrides = dict(config.model_overrides)
    preset = presets.get(config.model)
    if config.compute_dtype is not None:
        overrides.setdefault("dtype", jnp.dtype(config.compute_dtype))
        if preset.reversible:
            overrides.setdefault("carry_dtype", jnp.float32)
    for name in ("arithmetic", "frac_bits"):
        if getattr(config, name) is not None and preset.reversible:
            overrides.setdefault(name, getattr(config, name))
    if config.image_size is not None and preset.accepts("image_size"):
        overrides.setdefault("image_size", config.image_size)
    return overrides


def create_train_state(
    config: TrainConfig, num_classes: int, in_channels: int
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """Builds the model and optimizer; returns ``(graphdef, state, tx)``.

    The NNX graph is split once here: training steps then work on pure pytrees.
    """
    model = build_model(config.model, _model_overrides(config), num_classes, in_channels,
                        config.seed)
    if config.init_from is not None:
        finetune.init_from(model, config.init_from)
    # Everything that is not a Param rides in `batch_stats`: BatchNorm statistics and model
    # constants such as the ViTs' block indices (for the RevNet zoo: `models.functional`).
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )
    return graphdef, state, tx


def abstract_train_state(
    config: TrainConfig, num_classes: int, in_channels: int
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """`create_train_state` on shapes only, to compile a step or restore into.

    Returns:
      ``(graphdef, state, tx)``; every leaf of the state is a `jax.ShapeDtypeStruct` (nothing
      is allocated).
    """
    config = dataclasses.replace(config, init_from=None)  # shapes do not depend on the weights
    holder = {}

    def build():
        graphdef, state, tx = create_train_state(config, num_classes, in_channels)
        holder["graphdef"], holder["tx"] = graphdef, tx
        return state

    state = jax.eval_shape(build)
    return holder["graphdef"], state, holder["tx"]


def abstract_train_step(
    config: TrainConfig,
    num_classes: int,
    in_channels: int,
    image_shape: tuple[int, int, int],
    batch_size: int | None = None,
    *,
    donate: bool = False,
) -> tuple[Any, TrainState, dict[str, jax.ShapeDtypeStruct]]:
    """The trainer's jitted train step for ``config`` with an abstract state and batch (nothing
    is allocated), to lower and compile: memory reports, ahead-of-time compiles.

    Args:
      config: the model, its overrides and the recipe.
      num_classes, in_channels: the model's logits and image channels.
      image_shape: ``(height, width, channels)`` of one image.
      batch_size: images per step (default: ``config.batch_size``).
      donate: donate the state as the training loop does (old and new state share buffers).

    Returns:
      ``(step, state, batch)``: ``jax.jit(make_train_step(...))`` and `jax.ShapeDtypeStruct`
      pytrees to lower it with.
    """
    batch_size = batch_size or config.batch_size
    graphdef, state, tx = abstract_train_state(config, num_classes, in_channels)
    step = jax.jit(
        make_train_step(graphdef, tx, **step_options(config)), donate_argnums=0 if donate else ()
    )
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    return step, state, batch


def step_options(config: TrainConfig) -> dict[str, Any]:
    """The `make_train_step` keywords ``config`` implies."""
    return {"label_smoothing": config.label_smoothing, "seed": config.seed}


def _apply(graphdef, params, batch_stats, x, *, train, key=None, method=None, **kwargs):
    """`models.apply` for any model: returns every non-Param variable after the call, and gives
    ``key`` to models that draw random numbers in training (dropout, drop-path: `revjax.ViT` /
    `revjax.RevViT`); other models never see it. ``method``: the model's method to call (default
    the model itself) with ``x`` and ``kwargs``."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    fn = model if method is None else getattr(model, method)
    if train and key is not None and getattr(model, "uses_dropout_rng", False):
        out = fn(x, train=True, rngs=key, **kwargs)
    else:
        out = fn(x, train=train, **kwargs)
    return out, nnx.state(model, nnx.Not(nnx.Param))


def _loss_and_metrics(graphdef, params, batch_stats, batch, train, key=None, label_smoothing=0.0):
    """Per-example losses and accuracies: of the image's label, or for a language model's batch
    (``tokens`` / ``targets`` [N, T]) the mean over its positions of next-token prediction
    (through the model's ``token_losses``: its head and loss in chunks of ``logits_chunk``
    tokens)."""
    if "tokens" in batch:
        (losses, correct), new_stats = _apply(
            graphdef, params, batch_stats, batch["tokens"], train=train, key=key,
            method="token_losses", targets=batch["targets"], label_smoothing=label_smoothing,
        )
        # [N, T] -> [N]: every window weighs the same
        losses = jnp.mean(losses.astype(jnp.float32), axis=-1)
        return losses, jnp.mean(correct, axis=-1), new_stats
    logits, new_stats = _apply(graphdef, params, batch_stats, batch["image"], train=train, key=key)
    logits = logits.astype(jnp.float32)
    losses = cross_entropy(logits, batch["label"], label_smoothing)
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    return losses, correct, new_stats


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    seed: int = 0,
) -> Callable:
    """Returns the pure step ``(state, batch) -> (state, metrics)`` (not yet jitted).

    ``metrics``: the mean ``loss`` and ``accuracy``; for a model with fixed-point sequences
    also ``rebuild_mismatches``, the step's number of unit rebuilds that differed from the
    forward (added to the `revjax.RebuildMismatches` running counts in ``batch_stats``).

    Args:
      graphdef: the model's static part (`revjax.models.functional`).
      tx: the optimizer.
      label_smoothing: smoothing of the training targets (`cross_entropy`); the reported loss
        is the smoothed one.
      seed: models with dropout / drop-path get the key ``fold_in(fold_in(key(seed), 1),
        step)``: a function of the step, so a resumed run draws the same masks.
    """

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), state.step)
        # The fixed-point sequences' `RebuildMismatches` are differentiated beside the
        # parameters: their gradient is this step's count of units whose rebuild differed from
        # the forward. A model without any differentiates the parameters only.
        probes, rest = nnx.split_state(state.batch_stats, RebuildMismatches, ...)
        counted = bool(jax.tree.leaves(probes))

        def loss_fn(params, probes):
            stats = nnx.merge_state(rest, probes) if counted else state.batch_stats
            losses, correct, new_stats = _loss_and_metrics(
                graphdef, params, stats, batch, train=True, key=key,
                label_smoothing=label_smoothing,
            )
            return jnp.mean(losses), (jnp.mean(correct), new_stats)

        (loss, (accuracy, new_stats)), (grads, counts) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(state.params, probes)
        metrics = {"loss": loss, "accuracy": accuracy}
        if counted:
            new_stats, metrics["rebuild_mismatches"] = add_rebuild_counts(new_stats, counts)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """Returns ``(state, batch) -> {"correct", "loss", "count"}`` sums over the masked batch."""

    def eval_step(state: TrainState, batch: Mapping[str, jax.Array]):
        losses, correct, _ = _loss_and_metrics(
            graphdef, state.params, state.batch_stats, batch, train=False
        )
        mask = batch["mask"]
        return {
            "correct": jnp.sum(correct * mask),
            "loss": jnp.sum(losses * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def evaluate(eval_step: Callable, state: TrainState, batches: Iterator, sharding) -> dict:
    """Exact accuracy and loss over a masked, padded evaluation stream (and, for a language
    model's token windows, the perplexity ``exp(loss)``)."""
    from revjax.data import global_batch  # the input pipeline needs the experiments extra

    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    text = False
    for local in batches:
        text = text or "tokens" in local
        out = eval_step(state, global_batch(local, sharding))
        for k in totals:
            totals[k] += float(out[k])
    count = max(totals["count"], 1.0)
    result = {"eval_accuracy": totals["correct"] / count, "eval_loss": totals["loss"] / count}
    if text:  # a language model's: loss in nats per token, so perplexity exp(loss)
        result["eval_perplexity"] = math.exp(result["eval_loss"])
    return result
