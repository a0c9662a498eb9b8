"""The preset registry: every named model of the zoo, its class, architecture and twin.

A preset is a model class with its architecture fixed (``revnet38`` is `revjax.RevNet` with
units 3-3-3 and widths 32/32/64/112). Reversible presets name their *twin*, the
non-reversible model they are compared with: a RevNet's ResNet of similar parameter count
(the paper's tables), a RevViT's ViT of the same widths. `revjax.models` and `revjax.vit` define
their presets with `register`; the trainer, the configs in ``experiments/configs`` and the
benchmarks read names, classes and twins from here::

    revjax.presets.names()                            # every preset, in definition order
    revjax.presets.get("revnet38").twin               # "resnet32"
    revjax.presets.build("revnet38", 100, rngs=nnx.Rngs(0), memory_saving=False)
    revjax.presets.get("revvit_tiny").reversible      # True: it has memory_saving=
    revjax.presets.twins()                            # {"revnet38": "resnet32", ...}
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

__all__ = ["Preset", "build", "family_entry", "get", "names", "register", "twins"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named model: a class and the constructor arguments that fix its architecture.

    Attributes:
      name: the preset's name (``"revnet38"``), also its constructor's name in `revjax`.
      cls: the model class (`revjax.RevNet`, `revjax.ResNet`, `revjax.ViT`, `revjax.RevViT`).
      architecture: constructor arguments fixing the architecture (read-only).
      summary: one line: what the model is, its parameter count where known.
      twin: the name of the non-reversible model a reversible preset is compared with
        (RevNet -> ResNet, RevViT -> ViT); ``None`` for the non-reversible presets.
      num_classes: the default number of logits (1000 for ImageNet models, else 10; a
        language model's vocabulary size, its constructor's ``vocab_size``).
      image_size: the image side the preset is made for (its dataset's: CIFAR 32, ImageNet
        224, digits 8); a transformer's position embedding fixes it, a convolutional network
        takes other sizes too.
    """

    name: str
    cls: type[nnx.Module]
    architecture: Mapping[str, Any]
    summary: str
    twin: str | None
    num_classes: int
    image_size: int

    @property
    def reversible(self) -> bool:
        """Whether the model has a memory-saving (reversible) path.

        Such a model's ``memory_saving=False`` runs the same parameters through plain autodiff.
        """
        return self.accepts("memory_saving")

    def accepts(self, option: str) -> bool:
        """Whether the model's constructor takes ``option`` (e.g. ``"carry_dtype"``,
        ``"image_size"``, ``"dropout"``)."""
        return option in inspect.signature(self.cls.__init__).parameters

    def build(
        self, num_classes: int | None = None, *, rngs: nnx.Rngs, **overrides: Any
    ) -> nnx.Module:
        """The model: ``cls(**architecture, num_classes=..., **overrides, rngs=rngs)``.

        Args:
          num_classes: number of logits (default `num_classes`).
          rngs: initialisation keys.
          **overrides: any other constructor argument (``memory_saving``, ``dtype``, ...), or
            an architecture argument to change (``units_per_stage`` for a smaller variant).
        """
        classes = self.num_classes if num_classes is None else num_classes
        key = "vocab_size" if self.accepts("vocab_size") else "num_classes"
        return self.cls(**{**self.architecture, key: classes, **overrides}, rngs=rngs)


_REGISTRY: dict[str, Preset] = {}


def register(
    name: str,
    cls: type[nnx.Module],
    summary: str,
    *,
    twin: str | None = None,
    **architecture: Any,
) -> Callable[..., nnx.Module]:
    """Adds a preset and returns its constructor ``(num_classes=..., *, rngs, **overrides)``.

    Args:
      name: the preset's name; also the constructor's ``__name__``.
      cls: the model class.
      summary: first line of the constructor's docstring.
      twin: the non-reversible preset a reversible one is compared with.
      **architecture: constructor arguments fixing the architecture; ``num_classes`` here is
        the default (else 1000 for an ImageNet stem, 10 otherwise). The preset's `image_size`
        is ``architecture``'s, else 224 for an ImageNet stem, else 32.

    Raises:
      ValueError: a name registered twice.
    """
    if name in _REGISTRY:
        raise ValueError(f"A preset named {name!r} is registered already.")
    imagenet = architecture.get("stem") == "imagenet"
    num_classes = architecture.pop("num_classes", 1000 if imagenet else 10)
    num_classes = architecture.pop("vocab_size", num_classes)  # a language model's logits
    preset = Preset(
        name=name,
        cls=cls,
        architecture=types.MappingProxyType(dict(architecture)),
        summary=summary,
        twin=twin,
        num_classes=num_classes,
        image_size=architecture.get("image_size", 224 if imagenet else 32),
    )
    _REGISTRY[name] = preset

    def build(num_classes: int = num_classes, *, rngs: nnx.Rngs, **overrides) -> nnx.Module:
        return preset.build(num_classes, rngs=rngs, **overrides)

    build.__name__ = build.__qualname__ = name
    arch = ", ".join(f"{k}={v!r}" for k, v in architecture.items())
    twin_line = f"Twin: `revjax.{twin}`.\n" if twin else ""
    build.__doc__ = (
        f"{summary}\n\n"
        f"Architecture: {cls.__name__}({arch}).\n"
        f"{twin_line}"
        "Args:\n"
        f"  num_classes: number of logits (default {num_classes}).\n"
        "  rngs: initialisation keys.\n"
        f"  **overrides: any other {cls.__name__} argument (memory_saving, dropout, dtype, ...).\n"
    )
    return build


def family_entry(model: Any, table: Mapping[str, Any]) -> Any:
    """The entry of ``table`` (keyed by model class name) for ``model`` (a preset name, a model
    class or a module): its class's, else its nearest base's; None when no class has one.

    Per-family tables (the trainer's sharding rules and weight-decay leaves) look models up
    through it, so a subclass follows its base.
    """
    if isinstance(model, str):
        model = get(model).cls
    cls = model if isinstance(model, type) else type(model)
    for base in cls.__mro__:
        if base.__name__ in table:
            return table[base.__name__]
    return None


def names() -> list[str]:
    """Every preset's name, in definition order (the RevNet zoo, then the ViTs)."""
    return list(_REGISTRY)


def get(name: str) -> Preset:
    """The `Preset` called ``name``.

    Raises:
      ValueError: an unknown name; the message suggests the closest known names.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown model preset {name!r}.{hint} Known presets: {', '.join(_REGISTRY)}."
        ) from None


def build(
    name: str, num_classes: int | None = None, *, rngs: nnx.Rngs, **overrides: Any
) -> nnx.Module:
    """The model of the preset called ``name``: ``get(name).build(...)`` (see `Preset.build`).

    Raises:
      ValueError: an unknown name (with the closest known names).
    """
    return get(name).build(num_classes, rngs=rngs, **overrides)


def twins() -> dict[str, str]:
    """``{reversible preset: its twin}`` for every preset that has one."""
    return {p.name: p.twin for p in _REGISTRY.values() if p.twin is not None}
