"""Tests of the trainer: recipe, equivalence with plain autodiff, resume, devices, errors, data."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TINY, train_in_child

import revjax
from revjax import data, train
from revjax.train import TrainConfig
from revjax.train.report import format_memory_report


def _leaves_with_names(tree):
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        out.append(([str(n) for n in names if n != "value"], leaf))
    return out


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ------------------------------------------------------------------------------------------
# Recipe
# ------------------------------------------------------------------------------------------


def test_weight_decay_mask_covers_exactly_kernels():
    _, state, _ = train.create_train_state(TINY, num_classes=10, in_channels=1)
    mask = train.weight_decay_mask(state.params)
    names_and_flags = _leaves_with_names(mask)
    kernels = [n for n, flag in names_and_flags if flag]
    others = [n for n, flag in names_and_flags if not flag]
    assert kernels and all(n[-1] == "kernel" for n in kernels)
    assert all(n[-1] in ("scale", "bias") for n in others), others
    # Every conv and the dense layer carry a kernel; BatchNorm has scale and bias only.
    leaves = dict((tuple(n), leaf) for n, leaf in _leaves_with_names(state.params))
    assert any(leaf.ndim == 2 for n, leaf in leaves.items() if n[-1] == "kernel")  # dense
    assert any(leaf.ndim >= 4 for n, leaf in leaves.items() if n[-1] == "kernel")  # convs
    assert any(n[-1] == "bias" and "dense" in n for n in map(list, leaves))  # dense bias: no decay


def test_learning_rate_schedule_matches_paper():
    cfg = TrainConfig()  # CIFAR defaults: 0.1, x0.1 at 40k and 60k
    lr = train.learning_rate_schedule(cfg)
    for step, expected in [
        (0, 0.1),
        (39_999, 0.1),
        (40_000, 0.01),
        (59_999, 0.01),
        (60_000, 0.001),
        (79_999, 0.001),
    ]:
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6), step


def test_weight_decay_added_before_momentum():
    cfg = TrainConfig(learning_rate=0.1, momentum=0.9, weight_decay=0.5, lr_boundaries=())
    tx = train.make_optimizer(cfg)
    params = {"conv": {"kernel": jnp.array([1.0, 2.0])}, "bn": {"scale": jnp.array([3.0])}}
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    momentum = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        # Reference: g' = g + wd * w (kernels only); v = 0.9 v + g'; w -= lr * v.
        decayed = {
            "conv": {"kernel": grads["conv"]["kernel"] + 0.5 * params["conv"]["kernel"]},
            "bn": grads["bn"],
        }
        momentum = jax.tree.map(lambda v, g: 0.9 * v + g, momentum, decayed)
        expected = jax.tree.map(lambda w, v: w - 0.1 * v, params, momentum)
        params = optax.apply_updates(params, updates)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Reversible trainer == plain trainer
# ------------------------------------------------------------------------------------------


def test_reversible_trainer_equals_plain():
    # Three train steps (the later ones with momentum and updated batch statistics), each taken
    # by the reversible and the plain trainer from the same state: the plain trajectory's.
    # From one state the two forwards are the same rounded computation, so the update differs
    # only by the backward's float32 rounding (~1e-6 relative). Two separate trajectories would
    # test something else: their ~1e-7 differences can move a fixed-point carry by one grid
    # step (2**-16), which can flip a ReLU whose input is within ~1e-5 of zero and change a
    # BatchNorm bias gradient by ~10 % of that leaf. 1e-4 relative per leaf is far below any
    # real discrepancy (e.g. BN updated twice, or a missing gradient term: 1e-2 or more).
    plain_cfg = dataclasses.replace(TINY, model_overrides={"memory_saving": False})
    graphdef, state, tx = train.create_train_state(TINY, 10, 1)
    plain_graphdef, _, _ = train.create_train_state(plain_cfg, 10, 1)
    rev_step = jax.jit(train.make_train_step(graphdef, tx))
    plain_step = jax.jit(train.make_train_step(plain_graphdef, tx))
    it = data.train_iterator("digits", batch_size=TINY.batch_size, seed=TINY.seed)
    for _ in range(3):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        (rev, rev_metrics), (state, metrics) = rev_step(state, batch), plain_step(state, batch)
        assert float(rev_metrics["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)
        for name in ("params", "batch_stats", "opt_state"):
            a, b = getattr(rev, name), getattr(state, name)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                if np.issubdtype(np.asarray(y).dtype, np.floating):
                    assert _max_rel(x, y) <= 1e-4, name
    assert int(rev.step) == int(state.step) == 3


# ------------------------------------------------------------------------------------------
# The whole loop
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_reaches_95_percent(tmp_path):
    """A real convergence check on real (tiny) data: 16 epochs of 1,497 training digits, with
    the RevNet's default fixed-point carries. The run's time is execution: it trains in a child
    process under XLA's optimisation level 1 (tests/train_worker.py)."""
    assert {f.name: f.default for f in dataclasses.fields(revjax.RevNetOptions)}[
        "arithmetic"
    ] == "fixed"
    assert TINY.arithmetic is None  # the trainer keeps the model's default
    cfg = dataclasses.replace(
        TINY,
        model_overrides={"widths": (16, 16, 32)},
        batch_size=100,
        num_steps=240,
        lr_boundaries=(150, 210),
        log_every=40,
        eval_every=120,
    )
    result = train_in_child(cfg, tmp_path / "work")
    assert result["step"] == 240
    assert result["eval_accuracy"] >= 0.95, result  # 0.96-0.99 on three XLA settings
    work = tmp_path / "work"
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)
    assert {"train_loss", "train_accuracy", "learning_rate", "images_per_second"} <= set(records[0])
    assert any((work / "tensorboard").iterdir())


def test_resume_gives_identical_weights(tmp_path):
    cfg = dataclasses.replace(TINY, num_steps=4, checkpoint_every=2)
    full_state, full = train.train_and_evaluate(cfg, tmp_path / "full")
    # "Interrupted" after 2 steps (a checkpoint was written), then restarted with the same
    # workdir: resumes params, optimizer, batch stats and the data iterator position.
    train.train_and_evaluate(dataclasses.replace(cfg, num_steps=2), tmp_path / "split")
    with pytest.warns(train.ConfigChangedWarning, match=r"changes 1 field: num_steps 2 -> 4\."):
        resumed_state, resumed = train.train_and_evaluate(cfg, tmp_path / "split")
    assert resumed["step"] == full["step"] == 4
    for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(full_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical on CPU
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir() if p.is_dir()) == [
        "2",
        "4",
    ]


# BatchNorm statistics are over the global batch in both; only reduction order differs. With
# float carries that moves the state by ~1e-7: the trainer on 8 devices against one with float
# carries is held to 3e-6 in tests/test_sharding.py (the checkpoint resumed on another mesh).
# Fixed-point carries (the default, checked here) round every F/G output to a grid of 2**-16:
# a last-bit difference that crosses a rounding boundary becomes one grid step, which then
# moves ReLU masks of near-constant inputs (the digits' backgrounds), so the fixed-point
# default is held to a looser bound (about 100x the float one on these images).
@pytest.mark.slow
@pytest.mark.parametrize(
    "arithmetic, state_rtol, loss_rtol, accuracy_atol", [("fixed", 3e-2, 1e-3, 0.02)]
)
def test_eight_devices_match_one(tmp_path, arithmetic, state_rtol, loss_rtol, accuracy_atol):
    assert jax.device_count() >= 8
    cfg = dataclasses.replace(
        TINY, num_steps=2, batch_size=16, eval_batch_size=64, arithmetic=arithmetic
    )
    one_state, one = train.train_and_evaluate(cfg, tmp_path / "one")
    eight_state, eight = train.train_and_evaluate(
        dataclasses.replace(cfg, num_devices=8), tmp_path / "eight"
    )
    for a, b in zip(jax.tree.leaves(eight_state), jax.tree.leaves(one_state)):
        if np.issubdtype(np.asarray(b).dtype, np.floating):
            assert _max_rel(a, b) <= state_rtol
    assert eight["train_loss"] == pytest.approx(one["train_loss"], rel=loss_rtol)
    assert eight["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=accuracy_atol)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_batch_not_divisible_by_devices(tmp_path):
    cfg = dataclasses.replace(TINY, batch_size=12, num_devices=8)
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        train.train_and_evaluate(cfg, tmp_path)


def test_missing_dataset_names_prepare_command(tmp_path):
    cfg = dataclasses.replace(TINY, dataset="cifar10", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(data.DatasetNotPreparedError, match="python -m revjax.prepare cifar10"):
        train.train_and_evaluate(cfg, tmp_path / "work")


def test_nan_guard_names_step_and_keeps_good_checkpoint(tmp_path):
    cfg = dataclasses.replace(
        TINY, num_steps=6, checkpoint_every=1, learning_rate=1e30, lr_boundaries=()
    )
    with pytest.raises(train.NonFiniteLossError, match=r"NaN/Inf at step (\d+)") as info:
        train.train_and_evaluate(cfg, tmp_path)
    bad = info.value.step
    assert 1 < bad <= 6
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad  # nothing at or after the bad step was written


# ------------------------------------------------------------------------------------------
# TFDS mock data through the real configs; the entry point
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_name",
    ["cifar10_revnet38", "cifar100_resnet32",
     pytest.param("imagenet_revnet104", marks=pytest.mark.slow)],
)
def test_trainer_on_mock_tfds(config_name, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments.train import load_config

    cfg = dataclasses.replace(
        load_config(config_name, quick=True), num_devices=1, data_dir=str(tmp_path / "tfds")
    )
    with tfds.testing.mock_data(num_examples=24):
        _, result = train.train_and_evaluate(cfg, tmp_path / "work")
    assert result["step"] == 2
    assert np.isfinite(result["train_loss"])
    assert 0.0 <= result["eval_accuracy"] <= 1.0


def test_memory_report_shows_savings():
    cfg = dataclasses.replace(TINY, twin_model="resnet_tiny", batch_size=32)
    mem = train.train_step_memory(cfg, 10, 1, (16, 16, 1))
    assert mem["model"] < mem["model_plain"]
    report = format_memory_report(mem, cfg)
    assert "memory saving off" in report and "resnet_tiny" in report


def test_entry_point_quick(tmp_path, capsys, monkeypatch):
    from experiments.train import main

    monkeypatch.chdir(tmp_path)  # a relative workdir, as in the README (Orbax needs absolute)
    main(["--config", "digits", "--quick", "--workdir", "work", "--set", "num_devices=1"])
    assert (tmp_path / "work" / "checkpoints" / "2").is_dir()
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert summary["step"] == 2 and summary["dataset"] == "digits"
    with pytest.raises(SystemExit) as info:  # argparse's convention: status 2, "error: ..."
        main(["--config", "nope", "--workdir", str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: Unknown config 'nope'")


def test_drift_monitor_during_training(tmp_path):
    cfg = dataclasses.replace(TINY, num_steps=2, drift_every=1)
    train.train_and_evaluate(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    drift = [r for r in records if any(k.startswith("drift/") for k in r)]
    assert [r["step"] for r in drift] == [1, 2]
    values = [v for r in drift for k, v in r.items() if k.startswith("drift/")]
    assert values and all(np.isfinite(v) and v < 1e-3 for v in values), drift
