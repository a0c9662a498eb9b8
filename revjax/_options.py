"""Model options as frozen dataclasses: what every model constructor of the zoo shares.

A model family declares its options once, as the fields (with defaults and docs) of a frozen
dataclass; its constructors take them as keywords or as one ``options=`` object, so adding an
option is one field plus its use. The dataclass is static: a model keeps it as a plain
attribute, which NNX puts in the GraphDef, never in the State of Variables.

Fields made with `settable` are runtime switches (``memory_saving``, ``exact_every``,
``unroll``...): the model also holds them as plain attributes, which may be changed after
construction (``model.memory_saving = False``); ``model.options`` reports their current value.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from flax import nnx

Options = TypeVar("Options")

_SETTABLE = "revjax_settable"


def settable(default: Any) -> Any:
    """A dataclass field with ``default`` that the model also exposes as a settable attribute."""
    return dataclasses.field(default=default, metadata={_SETTABLE: True})


def settable_names(options_class: type) -> tuple[str, ...]:
    """The names of ``options_class``'s `settable` fields, in definition order."""
    return tuple(f.name for f in dataclasses.fields(options_class) if f.metadata.get(_SETTABLE))


def option_names(options_class: type) -> tuple[str, ...]:
    """Every field name of an options dataclass, in definition order."""
    return tuple(f.name for f in dataclasses.fields(options_class))


def options_like(
    options_class: type[Options], other: Any, changes: Mapping[str, Any], owner: str = ""
) -> Options:
    """An ``options_class`` built from the fields it shares with the options ``other`` (a
    dataclass of the same family: `RevViTOptions` from a ViT's `ViTOptions`), with
    ``changes``; the fields ``other`` lacks take their defaults.

    Raises:
      TypeError: a key of ``changes`` that is not a field (the message names ``owner``,
        default the class, and the closest field).
    """
    check_keywords(owner or options_class.__name__, options_class, changes)
    names = option_names(options_class)
    shared = {n: getattr(other, n) for n in option_names(type(other)) if n in names}
    return options_class(**{**shared, **changes})


def check_keywords(owner: str, options_class: type, keywords: Any) -> None:
    """Raises a TypeError naming the first keyword that is not a field of ``options_class``,
    with the closest field name (``owner``: who was called, e.g. ``"RevNet"``)."""
    names = option_names(options_class)
    for key in keywords:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {key!r}.{hint} Its options are "
                f"the fields of revjax.{options_class.__name__}: {', '.join(names)}."
            )


def resolve_options(
    owner: str, options_class: type[Options], options: Any, overrides: dict[str, Any]
) -> Options:
    """The options a constructor was called with: ``options`` (default: the class defaults)
    with ``overrides`` replaced, every keyword checked against the fields.

    Raises:
      TypeError: an unknown keyword (with the closest field), ``options`` of another class,
        or a required field missing.
    """
    check_keywords(owner, options_class, overrides)
    if options is None:
        required = [
            f.name
            for f in dataclasses.fields(options_class)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in overrides]
        if missing:
            raise TypeError(
                f"{owner}() needs {', '.join(missing)}: pass them as arguments, or pass "
                f"options=revjax.{options_class.__name__}(...)."
            )
        return options_class(**overrides)
    if not isinstance(options, options_class):
        raise TypeError(
            f"{owner}(options=...) takes a revjax.{options_class.__name__}, got "
            f"{type(options).__name__}."
        )
    return dataclasses.replace(options, **overrides) if overrides else options


def constructor_signature(
    options_class: type, positional: tuple[str, ...] = ()
) -> inspect.Signature:
    """The signature a constructor taking ``options_class``'s fields as keywords shows:
    ``(self, *positional, *, every other field=default, rngs, options=None)``.

    It is what `inspect.signature`, `help` and the API reference report, so every option is
    listed with its default (the preset registry reads ``memory_saving`` and ``image_size``
    from it).
    """
    hints = typing.get_type_hints(options_class)  # evaluated: `Dtype` reads as Any
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(options_class):
        kind = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if f.name in positional
            else inspect.Parameter.KEYWORD_ONLY
        )
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        params.append(inspect.Parameter(f.name, kind, default=default, annotation=hints[f.name]))
    params.sort(key=lambda p: p.kind)  # positional fields first, whatever their order
    params.append(inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY, annotation=nnx.Rngs))
    params.append(
        inspect.Parameter(
            "options",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=options_class | None,
        )
    )
    return inspect.Signature(params)


class ModelOptions:
    """Base of the options dataclasses (`revjax.RevNetOptions`, `revjax.ViTOptions`, ...)."""

    @classmethod
    def like(cls: type[Options], other: Any, **changes: Any) -> Options:
        """These options from the fields they share with ``other``, the options of a model of
        the same family (``RevViTOptions.like(vit.options)``: the ViT's architecture,
        regularisation and dtypes), with ``changes``; other fields take their defaults.

        Raises:
          TypeError: a keyword that is not a field (the message names the closest one).
        """
        return options_like(cls, other, changes)


class OptionsModule(nnx.Module):
    """An NNX module built from a frozen options dataclass (`options_class`).

    Subclasses call `init_options` first in ``__init__``; the options are kept as a static
    attribute and every `settable` field also becomes a plain attribute.
    """

    options_class: ClassVar[type]

    def init_options(self, options: Any) -> None:
        """Keeps ``options`` and sets the settable attributes from it."""
        self._built_with = options
        for name in settable_names(type(options)):
            setattr(self, name, getattr(options, name))

    @property
    def options(self) -> Any:
        """The model's options (a frozen dataclass), settable fields at their current value.

        ``dataclasses.replace(model.options, ...)`` and ``type(model)(..., options=...)``
        build a variant of the model.
        """
        built = self._built_with
        current = {name: getattr(self, name) for name in settable_names(type(built))}
        return dataclasses.replace(built, **current)
