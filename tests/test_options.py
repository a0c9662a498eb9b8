"""Model options (`revjax.RevNetOptions`, `revjax.ViTOptions`, ...): one frozen dataclass per
model, taken as keywords or as ``options=``, static in NNX, checked keyword by keyword.

Most tests build abstract models (`nnx.eval_shape`: no initialisation compile); the two that
compare outputs run one tiny forward each.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import presets

TINY_NET = dict(units_per_stage=(2, 2), widths=(8, 8, 16), in_channels=1)
TINY_VIT = dict(image_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3)

# model class -> (its options class, the arguments of a tiny instance)
MODELS = {
    revjax.RevNet: (revjax.RevNetOptions, TINY_NET),
    revjax.ResNet: (revjax.ResNetOptions, TINY_NET),
    revjax.ViT: (revjax.ViTOptions, TINY_VIT),
    revjax.RevViT: (revjax.RevViTOptions, TINY_VIT),
}
CLASSES = list(MODELS)
ids = [c.__name__ for c in CLASSES]


def _abstract(cls, **kw):
    return nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), **kw))


def _variables(model) -> dict[str, tuple]:
    """``{path: (variable type, shape, dtype)}`` of every Variable of a model."""
    flat = nnx.to_flat_state(nnx.state(model))
    return {
        "/".join(map(str, path)): (type(var).__name__, var.shape, jnp.dtype(var.dtype))
        for path, var in flat
    }


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_options_are_frozen_and_hashable(cls):
    options_class, kw = MODELS[cls]
    options = options_class(**kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_classes = 7
    assert hash(options) == hash(options_class(**kw))
    assert cls.options_class is options_class


def test_sequences_are_stored_as_tuples():
    listed = revjax.RevNetOptions(units_per_stage=[2, 2], widths=[8, 8, 16], strides=[1, 2])
    assert listed == revjax.RevNetOptions(units_per_stage=(2, 2), widths=(8, 8, 16), strides=(1, 2))
    assert listed.units_per_stage == (2, 2) and isinstance(listed.widths, tuple)
    hash(listed)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_every_field_is_a_keyword_with_its_default(cls):
    """The constructor's signature lists every field (the preset registry and the benchmarks
    read defaults from it), and every field is accepted as a keyword."""
    options_class, kw = MODELS[cls]
    params = inspect.signature(cls.__init__).parameters
    fields = dataclasses.fields(options_class)
    assert [f.name for f in fields] == [p for p in params if p not in ("self", "rngs", "options")]
    for f in fields:
        expected = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert params[f.name].default == expected, f.name
    defaults = options_class(**kw)
    every = {f.name: getattr(defaults, f.name) for f in fields}
    model = _abstract(cls, **every)
    assert model.options == defaults


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_unknown_keyword_names_the_closest_field(cls):
    _, kw = MODELS[cls]
    with pytest.raises(TypeError, match=r"'num_clases'.*Did you mean 'num_classes'\?"):
        cls(**kw, num_clases=3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"'colour'"):
        cls(**kw, colour="red", rngs=nnx.Rngs(0))


def test_unknown_keyword_through_a_preset_and_from_vit():
    with pytest.raises(TypeError, match="Did you mean 'memory_saving'"):
        revjax.revnet_tiny(rngs=nnx.Rngs(0), memory_savng=False)
    vit = _abstract(revjax.ViT, **TINY_VIT)
    with pytest.raises(TypeError, match=r"RevViT.from_vit.*'exact_evry'.*'exact_every'"):
        revjax.RevViT.from_vit(vit, exact_evry=2)
    with pytest.raises(TypeError, match="Did you mean 'remat_units'"):
        revjax.ResNet(**TINY_NET, remat_unit=True, rngs=nnx.Rngs(0))
    # A RevNet-only option is not a ResNet option: the registry tells the two apart by it.
    with pytest.raises(TypeError, match="'memory_saving'"):
        revjax.ResNet(**TINY_NET, memory_saving=False, rngs=nnx.Rngs(0))
    assert presets.get("revnet38").reversible and not presets.get("resnet32").reversible
    assert presets.get("revvit_tiny").accepts("image_size")


def test_missing_architecture_and_wrong_options_class():
    with pytest.raises(TypeError, match="units_per_stage, widths"):
        revjax.RevNet(rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="takes a revjax.RevNetOptions, got ResNetOptions"):
        revjax.RevNet(options=revjax.ResNetOptions(**TINY_NET), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_options_object_builds_the_keyword_model(cls):
    """``options=`` and keywords build the same Variables and the same GraphDef; keywords
    given next to ``options`` replace its fields; the options are no Variable."""
    options_class, kw = MODELS[cls]
    by_keywords = _abstract(cls, **{**kw, "num_classes": 5})
    options = options_class(**kw)
    by_options = _abstract(cls, options=options, num_classes=5)
    assert by_options.options == dataclasses.replace(options, num_classes=5)
    assert _variables(by_options) == _variables(by_keywords)
    graphdef, _ = nnx.split(by_options)
    assert graphdef == nnx.split(by_keywords)[0]
    hash(graphdef)  # static: usable as a jit static argument
    assert not any("options" in path or "built" in path for path in _variables(by_options))


def test_split_merge_keeps_options_and_settable_attributes():
    model = _abstract(revjax.RevNet, **TINY_NET, arithmetic="float", exact_every=1)
    model.memory_saving = False
    model.exact_every = 2
    assert model.options.memory_saving is False and model.options.exact_every == 2
    assert model.options.arithmetic == "float"
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    assert merged.options == model.options and merged.memory_saving is False
    rebuilt = nnx.eval_shape(lambda: revjax.RevNet(options=model.options, rngs=nnx.Rngs(0)))
    assert rebuilt.memory_saving is False and rebuilt.exact_every == 2
    assert rebuilt.options == model.options


def test_runtime_switches_change_the_graphdef_not_the_state():
    model = _abstract(revjax.RevViT, **TINY_VIT)
    before, state_before = nnx.split(model)
    model.memory_saving, model.unroll = False, 1
    after, state_after = nnx.split(model)
    assert before != after
    assert jax.tree.structure(state_before) == jax.tree.structure(state_after)
    assert model.options.memory_saving is False and model.options.unroll == 1


def test_from_vit_takes_the_vit_options():
    kw = dict(TINY_VIT, pool="cls", dropout=0.1, dtype=jnp.bfloat16)
    vit = _abstract(revjax.ViT, **kw)
    rev = nnx.eval_shape(
        lambda: revjax.RevViT.from_vit(
            revjax.ViT(**kw, rngs=nnx.Rngs(0)), memory_saving=False, drop_path_rate=0.2
        )
    )
    shared = [f.name for f in dataclasses.fields(revjax.TransformerOptions)]
    changed = {"drop_path_rate": 0.2}
    for name in shared:
        assert getattr(rev.options, name) == changed.get(name, getattr(vit.options, name)), name
    assert rev.options.memory_saving is False and rev.memory_saving is False
    # And back: a ViT's options from the RevViT's (the fields they share, then the defaults).
    back = revjax.ViTOptions.like(rev.options, pool="cls")
    assert back == dataclasses.replace(vit.options, drop_path_rate=0.2)
    with pytest.raises(TypeError, match="Did you mean 'pool'"):
        revjax.ViTOptions.like(rev.options, pol="cls")


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))


@pytest.mark.parametrize(
    "cls, kw",
    [
        (revjax.RevNet, dict(TINY_NET, arithmetic="float")),
        (revjax.RevViT, dict(TINY_VIT, in_channels=1)),
    ],
    ids=["RevNet", "RevViT"],
)
def test_options_and_keywords_give_identical_outputs(cls, kw, images):
    by_keywords = cls(**kw, rngs=nnx.Rngs(3))
    by_options = cls(options=cls.options_class(**kw), rngs=nnx.Rngs(3))
    leaves = jax.tree.leaves(nnx.state(by_keywords)), jax.tree.leaves(nnx.state(by_options))
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    # One compiled forward for both: their graphdefs are equal, so the second call reuses it.
    forward = nnx.jit(lambda model, x: model(x, train=False))
    np.testing.assert_array_equal(forward(by_keywords, images), forward(by_options, images))
