"""Sharding rules as data: where each parameter of a model family lives on a device mesh.

The mesh has three named axes (`MESH_AXES`): ``data`` (replicas of everything, the batch split
over them), ``fsdp`` (the batch split over it too, and every large parameter, its gradient and
its optimizer state split along one feature axis: each device keeps ``1 / fsdp`` of them and
XLA gathers a layer's parameters where the layer runs) and ``tensor`` (attention heads, MLP
hidden units and vocabulary split: each device computes its part of those layers).

A family's table maps parameter-path patterns to **logical axes**, one name per trailing
dimension of the parameter (a stacked unit parameter has one more, leading dimension: the unit
axis, never sharded, because the reversible scan reads one unit per iteration and GSPMD then
gathers that unit alone inside the loop). `LOGICAL_AXIS_RULES` maps logical axes to mesh axes,
as MaxText's ``logical_axis_rules`` do. `plan_params` applies both to every parameter and says
why each one is placed as it is:

- a parameter whose path no pattern of its family matches is an error (nothing is replicated
  by accident);
- a parameter of fewer than ``min_size`` elements (biases, norm scales) is replicated on
  purpose: its gather would cost more than the memory it saves;
- a dimension not divisible by its mesh axis moves that mesh axis to the largest other free
  dimension that divides, else leaves the parameter replicated over that mesh axis, with the
  reason recorded.

The optimizer state follows the parameters (`train_state_shardings`: an optimizer leaf with the
path and shape of a parameter gets that parameter's sharding; counts and scalars are
replicated), so AdamW's two moments shrink with the parameters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from revjax import _partition

__all__ = [
    "BATCH_AXES",
    "CNN_RULES",
    "FAMILY_RULES",
    "GPT_RULES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "MIN_SHARDED_SIZE",
    "VIT_RULES",
    "Placement",
    "all_gathers",
    "batch_sharding",
    "create_sharded_train_state",
    "family_rules",
    "param_path",
    "plan_params",
    "train_state_shardings",
]


MESH_AXES = _partition.MESH_AXES

BATCH_AXES = _partition.BATCH_AXES
# Parameters with fewer elements stay replicated (biases, norm scales: 64 KiB in float32).
MIN_SHARDED_SIZE = 2**14
# The mesh axes that split parameters (``data`` only replicates them).
_PARAMETER_AXES = ("fsdp", "tensor")

# Logical axis -> the mesh axes it may be split over (in order). An empty tuple: never split.
LOGICAL_AXIS_RULES: Mapping[str, tuple[str, ...]] = {
    "units": (),  # stacked units of a scan: each iteration reads one unit whole
    "embed": ("fsdp",),  # the model width of a transformer, in and out of every projection
    "heads": ("tensor",),  # attention heads: q / k / v outputs, the output projection's input
    "mlp": ("tensor",),  # MLP hidden units
    "vocab": ("tensor",),  # token embedding rows, the language-model head's outputs
    "conv_out": ("fsdp",),  # a convolution's output channels
    "conv_in": ("tensor",),  # a convolution's input channels
    "channels": ("fsdp",),  # BatchNorm scale / bias, dense input of a CNN head
    "spatial": (),  # kernel height / width, positions: small
    "classes": (),  # classifier outputs: rarely divisible, small
}

# Family tables: (path pattern, logical axes of the trailing dimensions). Paths are the
# parameter's attribute names joined by "/" (`param_path`); the first full match wins.
CNN_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r".*conv\d*/kernel", ("spatial", "spatial", "conv_in", "conv_out")),
    (r".*project/kernel", ("spatial", "spatial", "conv_in", "conv_out")),
    (r".*bn\d*/(scale|bias)", ("channels",)),
    (r"head/dense/kernel", ("channels", "classes")),
    (r"head/dense/bias", ("classes",)),
)

VIT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"patch_embed/conv/kernel", ("spatial", "spatial", "conv_in", "embed")),
    (r"patch_embed/conv/bias", ("embed",)),
    (r"pos_embed", ("spatial", "spatial", "embed")),
    (r"cls_token", ("spatial", "spatial", "embed")),
    (r".*qkv/kernel", ("embed", "heads")),
    (r".*qkv/bias", ("heads",)),
    (r".*proj/kernel", ("heads", "embed")),
    (r".*proj/bias", ("embed",)),
    (r".*fc1/kernel", ("embed", "mlp")),
    (r".*fc1/bias", ("mlp",)),
    (r".*fc2/kernel", ("mlp", "embed")),
    (r".*fc2/bias", ("embed",)),
    (r".*norm/(scale|bias)", ("embed",)),
    (r"head/kernel", ("embed", "classes")),
    (r"head/bias", ("classes",)),
)

# Transformer language models: token embeddings (also the tied output head), a learned
# position table [context, D], a gated MLP's gate, and the ViT's names for the rest (qkv, proj,
# fc1, fc2, norms).
GPT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r".*(wte|tok\w*|token\w*|embed\w*)/embedding", ("vocab", "embed")),
    (r"pos_embed", ("spatial", "embed")),
    (r".*(gate|up)/kernel", ("embed", "mlp")),
    (r".*(gate|up)/bias", ("mlp",)),
    (r".*(lm_)?head/kernel", ("embed", "vocab")),
    (r".*(lm_)?head/bias", ("vocab",)),
    *VIT_RULES,
)

# Model class name -> its family's table (`family_rules`).
FAMILY_RULES: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "RevNet": CNN_RULES,
    "ResNet": CNN_RULES,
    "ViT": VIT_RULES,
    "RevViT": VIT_RULES,
    "GPT": GPT_RULES,
    "RevGPT": GPT_RULES,
}


def family_rules(model: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The rule table of ``model`` (a module, its class, or a `revjax.presets` name).

    Raises:
      ValueError: no table for the model's class (or any of its bases).
    """
    from revjax import presets

    rules = presets.family_entry(model, FAMILY_RULES)
    if rules is not None:
        return rules
    cls = presets.get(model).cls if isinstance(model, str) else model
    cls = cls if isinstance(cls, type) else type(cls)
    raise ValueError(
        f"No sharding rules for {cls.__name__}; known families: {', '.join(FAMILY_RULES)}. Add "
        "its table to revjax.train.sharding.FAMILY_RULES or pass rules= explicitly."
    )


def param_path(path: Sequence[Any]) -> str:
    """A tree path as ``"stages/0/reversible/f/conv1/kernel"`` (no trailing ``value``)."""
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        names.append(str(name))
    if names and names[-1] == "value":
        names.pop()
    return "/".join(names)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one parameter lives: its logical axes (``"units"`` for a stacked unit axis), its
    `PartitionSpec`, and why it is not split further (``""`` when every rule applied)."""

    path: str
    shape: tuple[int, ...]
    logical: tuple[str, ...]
    spec: P
    reason: str = ""

    @property
    def replicated(self) -> bool:
        return all(entry is None for entry in self.spec)


def _place(path: str, shape: tuple[int, ...], logical: tuple[str, ...],
           mesh_shape: Mapping[str, int], min_size: int) -> Placement:
    size = math.prod(shape)
    if size < min_size:
        return Placement(path, shape, logical, P(*[None] * len(shape)),
                         f"small: {size} elements < min_size {min_size}")
    assigned: list[tuple[str, ...]] = [()] * len(shape)
    notes = []
    # Tensor first: it splits only the dimensions named for it (heads, MLP hidden units,
    # vocabulary). Then fsdp, which splits every large parameter somewhere.
    for mesh_axis in sorted(mesh_shape, key=lambda a: a != "tensor"):
        count = mesh_shape[mesh_axis]
        if count == 1 or mesh_axis not in _PARAMETER_AXES:
            continue
        wanted = [i for i, name in enumerate(logical) if mesh_axis in LOGICAL_AXIS_RULES[name]]
        fits = [i for i in wanted if not assigned[i] and shape[i] % count == 0]
        if not fits and mesh_axis == "fsdp":
            # The largest other free dimension that divides, else one tensor already splits
            # (both axes on it) where the product divides.
            splits = [math.prod(mesh_shape[a] for a in axes) * count for axes in assigned]
            free = [i for i, name in enumerate(logical)
                    if name not in ("units", "spatial") and shape[i] % splits[i] == 0]
            fits = sorted(free, key=lambda i: (bool(assigned[i]), -shape[i]))[:1]
        if wanted and not (fits and fits[0] in wanted):
            dims = ", ".join(f"{logical[i]} {shape[i]}" for i in wanted)
            why = f"{mesh_axis}: {dims} not divisible by {count}"
            notes.append(f"{why}; split {logical[fits[0]]} {shape[fits[0]]} instead" if fits
                         else f"{why}: replicated over it")
        elif not fits and mesh_axis == "fsdp":
            notes.append("fsdp: no dimension divisible by it: replicated over it")
        if fits:
            assigned[fits[0]] = (*assigned[fits[0]], mesh_axis)
    spec = [None if not axes else axes[0] if len(axes) == 1 else axes for axes in assigned]
    return Placement(path, shape, logical, P(*spec), "; ".join(notes))


def plan_params(params: Any, mesh_shape: Mapping[str, int], rules: Sequence[tuple[str, tuple]],
                min_size: int = MIN_SHARDED_SIZE) -> dict[str, Placement]:
    """The `Placement` of every leaf of ``params`` (arrays or `jax.ShapeDtypeStruct`).

    Args:
      params: the parameter tree (an `nnx.State` of `nnx.Param`, or any pytree of arrays).
      mesh_shape: mesh axis name -> size (``dict(mesh.shape)``).
      rules: the family's table (`family_rules`).
      min_size: parameters with fewer elements stay replicated.

    Raises:
      ValueError: parameters no pattern matches with at most as many logical axes as they
        have dimensions (all of them named).
    """
    compiled = [(re.compile(pattern), axes) for pattern, axes in rules]
    plan, unmatched = {}, []
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path, shape = param_path(key_path), tuple(leaf.shape)
        # The first pattern that matches and names at most as many dimensions as there are.
        axes = next((axes for rx, axes in compiled
                     if rx.fullmatch(path) and len(axes) <= len(shape)), None)
        if axes is None:
            unmatched.append(f"{path} {shape}")
            continue
        extra = len(shape) - len(axes)
        logical = ("units",) * extra + tuple(axes)  # leading stacked-unit axes
        plan[path] = _place(path, shape, logical, mesh_shape, min_size)
    if unmatched:
        raise ValueError(
            f"No sharding rule matches {len(unmatched)} parameter(s): {', '.join(unmatched)}. "
            "Add a pattern for them to the family's table in revjax.train.sharding."
        )
    return plan


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch's sharding: its leading axis split over every mesh axis in `BATCH_AXES`."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes))


def _path_keys(key_path) -> tuple[str, ...]:
    return tuple(param_path(key_path).split("/")) if key_path else ()


def train_state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, tuple]],
                          min_size: int = MIN_SHARDED_SIZE) -> Any:
    """The `NamedSharding` tree of a `revjax.train.TrainState` (arrays or shapes).

    Parameters follow `plan_params`; an optimizer-state leaf whose path ends with a
    parameter's path and has its shape takes that parameter's sharding (moments, momentum);
    everything else (step, counts, BatchNorm statistics, constants) is replicated.
    """
    plan = plan_params(state.params, dict(mesh.shape), rules, min_size)
    by_path = {tuple(path.split("/")): placement for path, placement in plan.items()}
    longest = max((len(k) for k in by_path), default=0)
    replicated = NamedSharding(mesh, P())

    def follow(key_path, leaf):
        keys = _path_keys(key_path)
        for n in range(min(longest, len(keys)), 0, -1):
            placement = by_path.get(keys[-n:])
            if placement is not None and placement.shape == tuple(getattr(leaf, "shape", ())):
                return NamedSharding(mesh, placement.spec)
        return replicated

    params = jax.tree_util.tree_map_with_path(
        lambda kp, leaf: NamedSharding(mesh, plan[param_path(kp)].spec), state.params)
    opt_state = jax.tree_util.tree_map_with_path(follow, state.opt_state)
    rest = jax.tree.map(lambda _: replicated, state)
    return rest.replace(params=params, opt_state=opt_state)


# --------------------------------------------------------------------------------------------
# Checking a compiled program: where the all-gathers are
# --------------------------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^,}\s]+(?:, "
                     r"%[\w.\-]+)*)\}?")
_WHILE_BODY = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_GATHER = re.compile(r"= (.*?) all-gather(?:-start)?\(")
_SHAPE = re.compile(r"\w+\[[\d,]*\]")


def all_gathers(hlo_text: str) -> dict[str, list[str]]:
    """The result shapes of the all-gathers in a compiled program's HLO text
    (``jitted.lower(...).compile().as_text()``), split into ``"in_loops"`` (in a while loop's
    body or anything it calls: gathered once per iteration) and ``"outside"``."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = computations.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
    bodies = {m.group(1) for lines in computations.values() for line in lines
              for m in [_WHILE_BODY.search(line)] if m}
    in_loops, todo = set(), list(bodies)
    while todo:  # everything a loop body calls, transitively
        name = todo.pop()
        if name in in_loops or name not in computations:
            continue
        in_loops.add(name)
        for line in computations[name]:
            for m in _CALLED.finditer(line):
                todo.extend(n.strip().lstrip("%") for n in m.group(1).split(","))
    found: dict[str, list[str]] = {"in_loops": [], "outside": []}
    for name, lines in computations.items():
        where = "in_loops" if name in in_loops else "outside"
        for line in lines:
            match = _GATHER.search(line)
            if match:  # an async start's result is a tuple (operand, result): the last shape
                found[where].append(_SHAPE.findall(match.group(1))[-1])
    return found


# --------------------------------------------------------------------------------------------
# The trainer's train state, created sharded
# --------------------------------------------------------------------------------------------


def create_sharded_train_state(config: Any, num_classes: int, in_channels: int, mesh: Mesh,
                               min_size: int = MIN_SHARDED_SIZE):
    """`revjax.train.create_train_state` placed on ``mesh`` by the model family's rules.

    The state is built by a `jax.jit` whose outputs have the state's shardings, so each device
    initialises only its own shards (a model too large for one device is never whole on one).
    A config with ``init_from`` (weights read from a file on the host) is built on the host
    and then placed.

    Returns:
      ``(graphdef, state, tx, shardings)``: ``shardings`` is the state's `NamedSharding` tree
      (`train_state_shardings`), for the train step's input and output shardings.
    """
    from revjax.train.steps import abstract_train_state, create_train_state

    graphdef, abstract, tx = abstract_train_state(config, num_classes, in_channels)
    shardings = train_state_shardings(abstract, mesh, family_rules(config.model), min_size)
    if config.init_from is not None:
        _, state, _ = create_train_state(config, num_classes, in_channels)
        return graphdef, jax.device_put(state, shardings), tx, shardings
    build = jax.jit(lambda: create_train_state(config, num_classes, in_channels)[1],
                    out_shardings=shardings)
    return graphdef, build(), tx, shardings
