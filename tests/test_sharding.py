"""Sharding rules (every parameter of every family placed on purpose) and the compiled program
of a sharded step (unit parameters gathered inside the reversible scan, one unit at a time)."""

import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY, child_env, config_fields, restore_on_mesh, start_two_processes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_rebuild_train import forced_mismatch  # noqa: F401 - a fixture

import revjax
from revjax import presets, train
from revjax.train import TrainConfig
from revjax.train import sharding as S
from revjax.train.steps import create_train_state, make_train_step

# One preset per block kind and family (basic / bottleneck, RevNet / ResNet, ViT with a class
# token / RevViT, GPT / RevGPT language models); shapes only.
PRESETS = ["revnet38", "resnet32", "revnet104", "resnet101", "vit_s16", "revvit_b16",
           "gpt_char_cpu", "revgpt_char_cpu", "gpt2_small"]
MESHES = [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2},
          {"data": 2, "fsdp": 2, "tensor": 2}]


def _abstract_params(name):
    return jax.eval_shape(
        lambda: nnx.state(presets.build(name, 1000, rngs=nnx.Rngs(0)), nnx.Param))


@pytest.mark.parametrize("name", PRESETS)
def test_every_large_parameter_is_sharded_or_says_why(name):
    params = _abstract_params(name)
    for mesh_shape in MESHES:
        plan = S.plan_params(params, mesh_shape, S.family_rules(name))
        assert len(plan) == len(jax.tree.leaves(params))
        for p in plan.values():
            size = math.prod(p.shape)
            if size < S.MIN_SHARDED_SIZE:
                assert p.replicated and p.reason.startswith("small"), p
                continue
            named = [a for entry in p.spec if entry for a in np.atleast_1d(entry)]
            assert "fsdp" in named or "fsdp: " in p.reason, p  # fsdp splits every large one
            if mesh_shape["tensor"] > 1 and any(ax in p.logical for ax in ("heads", "mlp")):
                assert "tensor" in named or "tensor: " in p.reason, p
            assert "data" not in named
            if p.logical[0] == "units":  # stacked units: never split along the unit axis
                assert p.spec[0] is None, p
            for dim, entry in zip(p.shape, p.spec, strict=False):
                if entry:
                    assert dim % math.prod(mesh_shape[a] for a in np.atleast_1d(entry)) == 0
        # The transformer layers are split over tensor along heads / hidden units.
        if mesh_shape["tensor"] > 1 and "vit" in name:
            fc1 = next(p for path, p in plan.items() if path.endswith("fc1/kernel"))
            assert fc1.spec == P(None, "fsdp", "tensor")


def test_indivisible_axis_moves_or_replicates_with_a_reason():
    params = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 30, 56), jnp.float32)},
              "odd": {"kernel": jax.ShapeDtypeStruct((3, 3, 7, 7), jnp.float32)}}
    rules = ((r".*/kernel", ("spatial", "spatial", "conv_in", "conv_out")),)
    plan = S.plan_params(params, {"data": 1, "fsdp": 8, "tensor": 2}, rules, min_size=0)
    conv, odd = plan["conv/kernel"], plan["odd/kernel"]
    assert conv.spec == P(None, None, "tensor", "fsdp") and conv.reason == ""
    plan = S.plan_params(params, {"data": 1, "fsdp": 4, "tensor": 4}, rules, min_size=0)
    conv = plan["conv/kernel"]
    assert conv.spec == P(None, None, None, "fsdp")  # 30 % 4: tensor replicated, said so
    assert "tensor: conv_in 30 not divisible by 4" in conv.reason
    plan = S.plan_params(params, {"data": 1, "fsdp": 3, "tensor": 1}, rules, min_size=0)
    conv, odd = plan["conv/kernel"], plan["odd/kernel"]
    assert conv.spec == P(None, None, "fsdp", None) and "split conv_in 30 instead" in conv.reason
    assert odd.replicated and "replicated over it" in odd.reason


def test_unmatched_parameter_is_an_error():
    params = {"mystery": {"kernel": jax.ShapeDtypeStruct((64, 64), jnp.float32)}}
    with pytest.raises(ValueError, match=r"mystery/kernel \(64, 64\)"):
        S.plan_params(params, {"data": 1, "fsdp": 8, "tensor": 1}, S.VIT_RULES)
    with pytest.raises(ValueError, match="known families"):
        S.family_rules(int)


@functools.cache
def _tiny_step(model, mesh_shape, min_size=1024):
    """``(state, compiled AdamW train step)`` of ``STEPS[model]`` on 8 devices as
    ``(data, fsdp, tensor)``; compiled once per module."""
    mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), S.MESH_AXES)
    config = TrainConfig(model=model, model_overrides={"unroll": 1, **STEPS[model]},
                         optimizer="adamw", dataset="digits", batch_size=16)
    graphdef, state, tx = create_train_state(config, 10, 1)
    shardings = S.train_state_shardings(state, mesh, S.family_rules(model), min_size=min_size)
    batch = {"image": jnp.zeros((16, 8, 8, 1)), "label": jnp.zeros((16,), jnp.int32)}
    data = S.batch_sharding(mesh)
    step = jax.jit(make_train_step(graphdef, tx), in_shardings=(shardings, data),
                   out_shardings=(shardings, NamedSharding(mesh, P())))
    with jax.set_mesh(mesh):
        return state, step.lower(state, batch).compile()


# A RevViT on 64 tokens and a RevNet whose stages scan 3 units; 8 host devices on fsdp.
STEPS = {
    "revvit_tiny": {"embed_dim": 64, "depth": 3, "num_heads": 2, "patch_size": 1},
    "revnet_tiny": {"units_per_stage": (4, 4), "widths": (16, 32, 32)},
}


@pytest.mark.parametrize("model", sorted(STEPS))
def test_unit_parameters_are_gathered_inside_the_scan(model):
    """The stacked unit parameters are gathered one unit per iteration inside the forward's
    and the backward's while loops; no gather outside a loop has a stacked parameter's shape
    (that would be every unit gathered at once). Parameters below ``min_size`` (BatchNorm
    scales) are replicated: XLA gathers such small stacked ones before the loop."""
    state, compiled = _tiny_step(model, (1, 8, 1))
    mesh_shape = dict(zip(S.MESH_AXES, (1, 8, 1), strict=True))
    plan = S.plan_params(state.params, mesh_shape, S.family_rules(model), min_size=1024)
    stacked = [p for p in plan.values() if p.logical[0] == "units" and not p.replicated]
    assert stacked
    gathers = S.all_gathers(compiled.as_text())

    def text(shape):
        return f"f32[{','.join(map(str, shape))}]"

    for p in stacked:
        assert text(p.shape) not in gathers["outside"], p.path  # not hoisted
        assert text(p.shape[1:]) in gathers["in_loops"], p.path  # one unit, in the loop
    assert not any(text(p.shape) in gathers["in_loops"] for p in stacked)


def test_per_device_arguments_fall_with_fsdp():
    """Compiled argument bytes per device (parameters, AdamW's moments, the batch) with every
    parameter over fsdp = 8 against the data-parallel replicated layout."""
    _, sharded = _tiny_step("revvit_tiny", (1, 8, 1))
    _, replicated = _tiny_step("revvit_tiny", (8, 1, 1))
    ratio = (sharded.memory_analysis().argument_size_in_bytes
             / replicated.memory_analysis().argument_size_in_bytes)
    # 1/8 of the kernels; parameters under min_size (norms, biases) and the batch are whole.
    assert ratio < 0.3


def _one_step(model, mesh_shape):
    """``(params, metrics, batch_stats)`` after one AdamW train step of ``STEPS[model]``
    (fixed-point carries) on a digits-shaped batch, sharded over 8 devices as ``mesh_shape``
    with every parameter split."""
    config = TrainConfig(model=model, model_overrides={"unroll": 1, **STEPS[model]},
                         optimizer="adamw", dataset="digits", batch_size=16)
    graphdef, state, tx = create_train_state(config, 10, 1)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), S.MESH_AXES)
    shardings = S.train_state_shardings(state, mesh, S.family_rules(model), min_size=0)
    data = S.batch_sharding(mesh)
    step = jax.jit(make_train_step(graphdef, tx), in_shardings=(shardings, data),
                   out_shardings=(shardings, NamedSharding(mesh, P())))
    with jax.set_mesh(mesh):
        state, metrics = step(jax.device_put(state, shardings), jax.device_put(batch, data))
    return state.params, metrics, state.batch_stats


def test_rebuild_count_on_a_mesh_is_zero():
    """A fixed-point RevViT stepped on a (1, 4, 2) mesh, every parameter split: the in-step
    rebuild count (the ``rebuild_mismatches`` metric and the running count in batch_stats) is
    there and 0: the backward rebuilt every unit's carries bit for bit from sharded weights."""
    _, metrics, stats = _one_step("revvit_tiny", (1, 4, 2))
    assert float(metrics["rebuild_mismatches"]) == 0.0
    assert revjax.rebuild_mismatches(stats) == {"blocks/rebuild_mismatches": 0.0}


@pytest.mark.usefixtures("forced_mismatch")
def test_rebuild_count_on_a_mesh_counts_units_not_devices():
    """With every unit's rebuild forced off the forward (`test_rebuild_train`'s nudge), a RevNet
    stepped on a (2, 2, 2) mesh counts each stage's reversible units once, as one device
    would: the checksums are whole-tensor sums, so a partitioned program neither misses a
    shard nor counts a unit once per device."""
    params, metrics, stats = _one_step("revnet_tiny", (2, 2, 2))
    units = {}  # "stages/i/reversible/rebuild_mismatches" -> that sequence's unit count
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = S.param_path(path)
        if name.endswith("reversible/f/conv1/kernel"):
            units[name.replace("f/conv1/kernel", "rebuild_mismatches")] = float(leaf.shape[0])
    assert len(units) == 2 and all(n > 1 for n in units.values())
    assert revjax.rebuild_mismatches(stats) == units
    assert float(metrics["rebuild_mismatches"]) == sum(units.values())


def test_residual_function_on_a_small_map_equals_one_device():
    """A basic residual function (two 3x3 convolutions, kernels split over fsdp and tensor) on
    a 4x4 feature map on a (2, 2, 2) mesh: loss and gradients equal one device's. Without the
    batch constraint on the first convolution's output XLA's SPMD partitioner computes this
    chain wrongly (the stage-2 units of a RevNet: 25 % relative error in the output)."""
    from revjax._blocks import BasicFunction, LayerConfig

    module = BasicFunction(32, 32, config=LayerConfig(), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(  # non-trivial BatchNorm scales and biases
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) * 0.2 + p, params)
    x = jnp.asarray(rng.normal(size=(16, 4, 4, 32)), jnp.float32)

    def loss_and_grad(params, rest, x):
        def loss(params, rest):
            y = nnx.merge(graphdef, params, rest, copy=True)(x, train=True)  # batch statistics
            return jnp.mean(jnp.sin(y))
        return jax.value_and_grad(loss)(params, rest)

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), S.MESH_AXES)
    plan = S.plan_params(params, dict(mesh.shape), S.CNN_RULES, min_size=0)
    assert plan["conv1/kernel"].spec == P(None, None, "tensor", "fsdp")
    specs = jax.tree_util.tree_map_with_path(
        lambda kp, _: NamedSharding(mesh, plan[S.param_path(kp)].spec), params)
    one = jax.jit(loss_and_grad)(params, rest, x)
    with jax.set_mesh(mesh):
        sharded = jax.jit(loss_and_grad, in_shardings=(specs, None, S.batch_sharding(mesh)))(
            jax.device_put(params, specs), rest, x)
    assert _max_rel_l2(sharded, one) <= 1e-5


def test_mesh_tool_compiles_a_language_model_per_device():
    """`experiments.aot.mesh`'s sharded compile on this host's 8 devices with a token batch:
    with fsdp = 8 the parameters + AdamW bytes per device fall to about 1/8 of the replicated
    bytes (every large parameter split; the small ones whole), gathered inside the scan."""
    from experiments.aot import mesh as aot_mesh
    from experiments.aot.targets import SLICES, TARGETS

    # float32 compute: the suite's strict dtype promotion rejects flax's bf16 LayerNorm
    compile = functools.partial(
        aot_mesh.compile_sharded, jax.devices(), "revgpt_char_cpu",
        {"depth": 2, "embed_dim": 128, "num_heads": 2}, batch=1, size=16,
        config={"compute_dtype": None, "arithmetic": "float"})
    fsdp = compile(mesh_shape=(1, 8, 1))
    assert fsdp["global_batch"] == 8
    assert fsdp["state"] < 0.2 * fsdp["state_replicated"]
    assert fsdp["gathers_in_loops"] > 0 and fsdp["total"] > 0
    with pytest.raises(SystemExit, match=r"mesh \(2, 2, 1\) has 4 devices"):
        compile(mesh_shape=(2, 2, 1))
    for target in SLICES.values():  # a slice is a topology over one single-chip target
        assert TARGETS[target.chip.name] is target.chip


# ------------------------------------------------------------------------------------------
# Sharded training equals one device
# ------------------------------------------------------------------------------------------


# A RevGPT of 2 blocks of width 32 on a context of 16 characters.
LANGUAGE = {"revgpt_char_cpu": {"depth": 2, "embed_dim": 32, "num_heads": 2,
                                "context_length": 16}}


@functools.cache
def _three_steps(model, mesh_shape):
    """Parameters after 3 SGD steps (float carries) on one device (``mesh_shape`` None) or
    sharded over 8 devices as ``(data, fsdp, tensor)``, every parameter split (min_size 0)."""
    rng = np.random.default_rng(0)
    if model in LANGUAGE:  # 16 windows of 16 characters
        config = TrainConfig(model=model, dataset="shakespeare_char", batch_size=16,
                             model_overrides=LANGUAGE[model])
        graphdef, state, tx = create_train_state(config, 65, 1)
        batches = [{"tokens": jnp.asarray(rng.integers(0, 65, (16, 16)), jnp.int32),
                    "targets": jnp.asarray(rng.integers(0, 65, (16, 16)), jnp.int32)}
                   for _ in range(3)]
    else:
        config = TrainConfig(model=model, dataset="digits", batch_size=16, arithmetic="float")
        graphdef, state, tx = create_train_state(config, 10, 1)
        batches = [{"image": jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
                    "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)} for _ in range(3)]
    if mesh_shape is None:
        step = jax.jit(make_train_step(graphdef, tx))
        for batch in batches:
            state, _ = step(state, batch)
        return state.params
    mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), S.MESH_AXES)
    shardings = S.train_state_shardings(state, mesh, S.family_rules(model), min_size=0)
    data = S.batch_sharding(mesh)
    step = jax.jit(make_train_step(graphdef, tx), in_shardings=(shardings, data),
                   out_shardings=(shardings, NamedSharding(mesh, P())))
    state = jax.device_put(state, shardings)
    with jax.set_mesh(mesh):
        for batch in batches:
            state, _ = step(state, jax.device_put(batch, data))
    for leaf, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params),
                              strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)  # stayed sharded
    return state.params


# Relative L2 error per parameter. The RevViT's differences are reduction order (~4e-7 on 8
# devices). The RevNet's BatchNorm statistics over the global batch move it by ~1.1e-6 with
# pure data parallelism (8, 1, 1) already; parameter sharding adds less than that again.
# Meshes per model: data only, fsdp only (8-way: every sharded axis divisible by 8), and all
# three axes at once ((2, 2, 2): fsdp and tensor rules combined, as (1, 4, 2) would).
@pytest.mark.slow
@pytest.mark.parametrize("model, mesh_shape, rtol", [
    (model, mesh, rtol)
    for model, rtol in (("revvit_tiny", 1e-6), ("revnet_tiny", 3e-6), ("revgpt_char_cpu", 1e-5))
    for mesh in ((8, 1, 1), (1, 8, 1), (2, 2, 2))
])
def test_sharded_training_equals_one_device(model, mesh_shape, rtol):
    one, sharded = _three_steps(model, None), _three_steps(model, mesh_shape)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(one),
                            strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        error = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert error <= rtol, (S.param_path(path), error)


def test_language_model_rules_by_name():
    """GPT / RevGPT parameter names (token embedding tied to the head, a learned position
    table, attention and a gated MLP, stacked over 12 blocks) are all placed."""
    f32 = jnp.float32
    params = {
        "embed": {"embedding": jax.ShapeDtypeStruct((50304, 768), f32)},
        "pos_embed": jax.ShapeDtypeStruct((1024, 768), f32),
        "blocks": {"f": {"qkv": {"kernel": jax.ShapeDtypeStruct((12, 768, 2304), f32)},
                         "proj": {"kernel": jax.ShapeDtypeStruct((12, 768, 768), f32)},
                         "norm": {"scale": jax.ShapeDtypeStruct((12, 768), f32)}},
                   "g": {"gate": {"kernel": jax.ShapeDtypeStruct((12, 768, 2048), f32)},
                         "fc1": {"kernel": jax.ShapeDtypeStruct((12, 768, 2048), f32)},
                         "fc2": {"kernel": jax.ShapeDtypeStruct((12, 2048, 768), f32)}}},
        "norm": {"scale": jax.ShapeDtypeStruct((768,), f32)},
    }
    plan = S.plan_params(params, {"data": 1, "fsdp": 4, "tensor": 2}, S.GPT_RULES)
    assert plan["embed/embedding"].spec == P("tensor", "fsdp")
    assert plan["pos_embed"].spec == P(None, "fsdp")
    assert plan["blocks/g/gate/kernel"].spec == P(None, "fsdp", "tensor")
    assert plan["blocks/f/proj/kernel"].spec == P(None, "tensor", "fsdp")
    assert plan["norm/scale"].replicated


# ------------------------------------------------------------------------------------------
# The trainer on a mesh: checkpoints across meshes and device counts, several processes
# ------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_process_worker.py"
# TINY (a RevNet on digits) with float carries (the differences across meshes are then
# reduction order), every device, an evaluation batch the 8 devices divide, and stages wide
# enough (64-channel halves) that their conv kernels pass the size below which parameters
# stay replicated.
SHARDED = dataclasses.replace(TINY, num_devices=None, arithmetic="float", eval_batch_size=64,
                              model_overrides={"widths": (16, 128, 128)})


def _fields(config):
    return json.dumps(config_fields(config))


def _max_rel_l2(a, b):
    errors = [np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
              / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30)
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
              if np.issubdtype(np.asarray(y).dtype, np.floating)]
    return max(errors)


@pytest.mark.slow
@pytest.mark.two_processes
def test_sharded_checkpoints_across_processes_meshes_and_device_counts(tmp_path):
    """Two processes and one, one checkpoint on every mesh:

    - a (1, 8, 1) mesh over 2 processes x 4 CPU devices (jax.distributed, each process reading
      its own half of the batch, fsdp across the processes) trains 2 steps to the checkpoint
      1 process x 8 devices reaches with the same mesh;
    - that one-process checkpoint restores bit for bit onto (2, 2, 2) (resharded) and, in a
      process with 4 devices, onto (1, 2, 2);
    - training resumed from it on (8, 1, 1) to step 3 (with a warning naming the mesh) equals
      3 steps on one device (one step more grows the float32 differences of reduction order
      past 1e-3 on this tiny net: measured 2e-3 after 4 steps on 8 devices against one).

    One test, so that the 8-device run serves as the two processes' reference and as the
    checkpoint the other meshes read."""
    config = dataclasses.replace(SHARDED, mesh=(1, 8, 1), num_steps=2)
    procs = start_two_processes([str(WORKER), "4", "train", _fields(config), str(tmp_path / "two")])
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    work = tmp_path / "one"
    one, _ = train.train_and_evaluate(config, work)
    step, two, _ = restore_on_mesh(tmp_path / "two", config)
    assert step == config.num_steps == 2
    # Whole state (BatchNorm statistics and momentum included); cross-process reductions (Gloo)
    # sum in another order than in-process ones: 2.9e-6 measured.
    assert _max_rel_l2(two, one) <= 1e-5

    saved = jax.tree.leaves(one)
    step, restored, shardings = restore_on_mesh(work, dataclasses.replace(SHARDED, mesh=(2, 2, 2)))
    assert step == 2
    for a, b, sharding in zip(jax.tree.leaves(restored), saved, jax.tree.leaves(shardings),
                              strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(sharding, a.ndim)
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(shardings.params))  # resharded

    four = dataclasses.replace(SHARDED, mesh=(1, 2, 2))
    out = tmp_path / "four.npz"
    subprocess.run([sys.executable, str(WORKER), "4", "restore", _fields(four), str(work),
                    str(out)], env=child_env(), check=True, timeout=600)
    with np.load(out) as four_devices:
        for i, b in enumerate(saved):
            np.testing.assert_array_equal(four_devices[f"leaf_{i}"], np.asarray(b))
        assert any("fsdp" in str(four_devices[f"spec_{i}"]) for i in range(len(saved)))

    with pytest.warns(train.ConfigChangedWarning, match="mesh"):  # resumed, and it says how
        resumed_state, resumed = train.train_and_evaluate(
            dataclasses.replace(SHARDED, mesh=(8, 1, 1), num_steps=3), work)
    one_device, _ = train.train_and_evaluate(
        dataclasses.replace(SHARDED, num_devices=1, num_steps=3), tmp_path / "one_device")
    assert resumed["step"] == 3
    assert _max_rel_l2(resumed_state.params, one_device.params) <= 3e-6
