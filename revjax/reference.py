"""Reference computations on a RevNet's weights, for tests and measurements.

- `fill`: weights from the constructor's distributions, drawn with NumPy into an abstract model
  (`nnx.eval_shape`), so making a model of any depth costs no XLA compile.
- `variant`: the same architecture built with other options (memory saving off, float64,
  another carry arithmetic...), as a graphdef the same weights fit.
- `gradients` / `float64_gradients`: loss gradients of a variant, and plain-autodiff gradients of
  the same weights in float64, the reference reversible gradients are compared against
  (`revjax.drift.gradient_agreement`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from revjax import models

__all__ = [
    "architecture",
    "cast",
    "fill",
    "float64_gradients",
    "gradient_function",
    "gradient_temp_bytes",
    "gradients",
    "variant",
]


def _draw(rng: np.random.Generator, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """One leaf from the constructor's distribution (see `revjax._blocks.conv_init`)."""
    leaf = path.rsplit("'", 2)[-2] if "'" in path else path
    if "kernel" in path and len(shape) >= 4:  # conv: truncated normal, std sqrt(2/(k*k*out))
        std = math.sqrt(2.0 / (shape[-4] * shape[-3] * shape[-1]))
        z = rng.standard_normal(shape)
        while np.any(bad := np.abs(z) > 2):
            z[bad] = rng.standard_normal(int(bad.sum()))
        return z * std
    if "kernel" in path:  # dense: U(-sqrt(3/fan_in), sqrt(3/fan_in))
        bound = math.sqrt(3.0 / shape[-2])
        return rng.uniform(-bound, bound, shape)
    if leaf in ("scale", "var"):
        return np.ones(shape)
    return np.zeros(shape)  # biases, BN shifts and running means


def fill(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Fills an abstract model (`nnx.eval_shape`) with weights from the constructor's
    distributions, drawn with NumPy (no XLA compile)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model)

    def draw(path, leaf):
        return jnp.asarray(_draw(rng, jax.tree_util.keystr(path), leaf.shape), leaf.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, state))
    return model


def cast(tree: Any, dtype) -> Any:
    """Every floating leaf of ``tree`` cast to ``dtype``."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def variant(model: nnx.Module, **overrides) -> nnx.GraphDef:
    """The graphdef of ``model``'s architecture built with ``overrides`` (same weights fit).

    Options not given take the model's arithmetic and exact_every, and the constructor's
    defaults otherwise (memory saving, dtypes, BatchNorm).
    """
    config = architecture(model, overrides)
    key = tuple(sorted(config.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable option value (a list): built without the cache
        return _build_graphdef(config)
    return _variant_graphdef(key)


@functools.lru_cache(maxsize=256)
def _variant_graphdef(config: tuple[tuple[str, Any], ...]) -> nnx.GraphDef:
    """One build per architecture: building a RevNet, even abstractly, costs about as much as
    tracing it, and a graphdef is immutable."""
    return _build_graphdef(dict(config))


def _build_graphdef(config: Mapping[str, Any]) -> nnx.GraphDef:
    abstract = nnx.eval_shape(lambda: models.RevNet(**config, rngs=nnx.Rngs(0)))
    graphdef, _, _ = models.functional(abstract)
    return graphdef


def architecture(model: nnx.Module, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``model``'s architecture as RevNet arguments, with ``overrides``."""
    cfg = dict(
        units_per_stage=model.units_per_stage,
        widths=model.widths,
        block=model.block,
        stem=model.stem.kind,
        strides=model.strides,
        num_classes=model.num_classes,
        in_channels=model.in_channels,
        unroll=model.unroll,
        downsample=model.downsample,
        arithmetic=model.arithmetic,
        exact_every=model.exact_every,
    )
    cfg.update(overrides)
    return cfg


@functools.cache
def gradient_function(graphdef: nnx.GraphDef):
    """The jitted loss gradient of ``graphdef`` with respect to its parameters (BatchNorm in
    train mode, softmax cross-entropy), one per graphdef: ``(params, batch_stats, x, y) ->
    grads``."""

    def loss(params, batch_stats, x, y):
        logits, _ = models.apply(graphdef, params, batch_stats, x, train=True)
        logits = logits.astype(jnp.float32 if logits.dtype != jnp.float64 else jnp.float64)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return jax.jit(jax.grad(loss))


def gradients(graphdef, params, batch_stats, x, y) -> Any:
    """Loss gradients with respect to ``params`` (BatchNorm in train mode), one compile per
    graphdef and shapes."""
    return gradient_function(graphdef)(params, batch_stats, x, y)


def float64_gradients(model: nnx.Module, params, batch_stats, x, y, **overrides) -> Any:
    """Plain-autodiff gradients of the same weights in float64 (x64 enabled inside)."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        graphdef = variant(
            model, param_dtype=jnp.float64, dtype=jnp.float64, memory_saving=False, **overrides
        )
        g = gradients(
            graphdef,
            cast(params, jnp.float64),
            cast(batch_stats, jnp.float64),
            x.astype(jnp.float64),
            y,
        )
        return jax.device_get(g)


def gradient_temp_bytes(model: nnx.Module, batch_size: int, image_size: int, **overrides) -> int:
    """Compiled temporary bytes of the loss gradient of ``model``'s `variant` with
    ``overrides``, on ``batch_size`` images of ``image_size`` squared (abstract: nothing runs;
    on CPU compiled at LLVM optimisation level 0, which assigns the same buffers faster)."""
    graphdef = variant(model, **overrides)
    _, params, batch_stats = models.functional(model)
    params, batch_stats = jax.eval_shape(lambda t: t, (params, batch_stats))
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, model.in_channels), jnp.float32)
    y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    cpu = jax.default_backend() == "cpu"
    options = {"xla_backend_optimization_level": 0} if cpu else None
    with jax.numpy_dtype_promotion("standard"):
        lowered = gradient_function(graphdef).lower(params, batch_stats, x, y)
    return lowered.compile(compiler_options=options).memory_analysis().temp_size_in_bytes
