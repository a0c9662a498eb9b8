"""The trainer's in-step rebuild check: the ``rebuild_mismatches`` metric, the running counts in
``batch_stats`` and the one `revjax.RebuildMismatchWarning`.

A mismatch is forced by making every F's differentiated evaluation three grid steps off its
plain one (a custom JVP) and rebuilding from the differentiated evaluation
(``rebuild="pullback"``): every unit's rebuild then differs from its forward.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY
from rebuild_cases import nudged

import revjax
from revjax import _blocks, _stages, data, layers, train


@pytest.fixture
def forced_mismatch(monkeypatch):
    """Every RevNet residual function nudged, every fixed-point rebuild from the pullback, and
    no layer warned yet in this process."""
    call = _blocks.BasicFunction.__call__
    monkeypatch.setattr(
        _blocks.BasicFunction, "__call__", lambda self, x, *, train: nudged(call(self, x,
                                                                                 train=train))
    )
    for module, name in ((layers, "reversible_sequence"), (_stages, "reversible_chain")):
        fn = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _fn=fn, **k: _fn(*a, **{**k, "rebuild": "pullback"})
        )
    monkeypatch.setattr(layers, "_WARNED", set())


def _records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train_loss" in r]


def test_forced_mismatch_is_logged_counted_and_warned_once(tmp_path, forced_mismatch):
    # Two steps, then resumed from their checkpoint for a third: the running counts are
    # checkpointed with the batch statistics and go on from there.
    cfg = dataclasses.replace(TINY, num_steps=3, log_every=2, checkpoint_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.train_and_evaluate(dataclasses.replace(cfg, num_steps=2), tmp_path)
        state, metrics = train.train_and_evaluate(cfg, tmp_path)
    rebuild = [w for w in caught if issubclass(w.category, revjax.RebuildMismatchWarning)]
    assert len(rebuild) == 1, [str(w.message) for w in rebuild]
    # revnet_tiny: one reversible unit per stage, each in its stage's ReversibleSequence.
    counts = revjax.rebuild_mismatches(state.batch_stats)
    assert counts == {
        "stages/0/reversible/rebuild_mismatches": 3.0,
        "stages/1/reversible/rebuild_mismatches": 3.0,
    }
    assert "stages/0/reversible/rebuild_mismatches (2 unit rebuilds)" in str(rebuild[0].message)
    # Summed over each log window: steps 1-2, then (resumed) step 3.
    assert [r["rebuild_mismatches"] for r in _records(tmp_path)] == [4.0, 2.0]
    assert metrics["rebuild_mismatches"] == 2.0


def test_revnet_run_logs_no_mismatch(tmp_path):
    cfg = dataclasses.replace(TINY, num_steps=2, log_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", revjax.RebuildMismatchWarning)
        state, metrics = train.train_and_evaluate(cfg, tmp_path)
    assert [r["rebuild_mismatches"] for r in _records(tmp_path)] == [0.0, 0.0]
    assert set(revjax.rebuild_mismatches(state.batch_stats).values()) == {0.0}
    assert metrics["rebuild_mismatches"] == 0.0


def _steps(cfg, batches, num_classes=10, in_channels=1):
    """``(state, [metrics of each step])`` of jitted train steps from a fresh state."""
    graphdef, state, tx = train.create_train_state(cfg, num_classes, in_channels)
    step = jax.jit(train.make_train_step(graphdef, tx))
    out = []
    for batch in batches:
        state, metrics = step(state, batch)
        out.append(metrics)
    return state, out


def _digits(n=2):
    it = data.train_iterator("digits", batch_size=TINY.batch_size, seed=TINY.seed)
    return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def test_invertible_revnet_counts_every_segment(forced_mismatch):
    # The chain's segments: each stage's entry unit, then its reversible units.
    cfg = dataclasses.replace(TINY, model_overrides={"downsample": "invertible"})
    state, metrics = _steps(cfg, _digits(1))
    counts = revjax.rebuild_mismatches(state.batch_stats)
    assert counts == {
        "stages/0/entry_rebuild_mismatches": 1.0,
        "stages/0/reversible/rebuild_mismatches": 1.0,
        "stages/1/entry_rebuild_mismatches": 1.0,
        "stages/1/reversible/rebuild_mismatches": 1.0,
    }
    assert float(metrics[0]["rebuild_mismatches"]) == 4.0


def test_invertible_revnet_counts_zero_normally():
    cfg = dataclasses.replace(TINY, model_overrides={"downsample": "invertible"})
    state, metrics = _steps(cfg, _digits(1))
    assert len(revjax.rebuild_mismatches(state.batch_stats)) == 4
    assert set(revjax.rebuild_mismatches(state.batch_stats).values()) == {0.0}
    assert float(metrics[0]["rebuild_mismatches"]) == 0.0


def test_float_model_has_no_count():
    # No fixed-point sequence: no variable, no metric (the step differentiates params only).
    state, metrics = _steps(dataclasses.replace(TINY, arithmetic="float"), _digits(1))
    assert revjax.rebuild_mismatches(state.batch_stats) == {}
    assert set(metrics[0]) == {"loss", "accuracy"}


def test_revvit_and_revgpt_steps_report_the_count():
    vit = dataclasses.replace(TINY, model="revvit_tiny")
    state, metrics = _steps(vit, _digits(1))
    assert float(metrics[0]["rebuild_mismatches"]) == 0.0
    assert list(revjax.rebuild_mismatches(state.batch_stats)) == ["blocks/rebuild_mismatches"]

    gpt = dataclasses.replace(
        TINY, model="revgpt_char_cpu", dataset="shakespeare_char",
        model_overrides={"embed_dim": 16, "depth": 2, "num_heads": 2, "context_length": 8},
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (4, 9)), jnp.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, metrics = _steps(gpt, [batch], num_classes=65)
    assert float(metrics[0]["rebuild_mismatches"]) == 0.0
    assert len(revjax.rebuild_mismatches(state.batch_stats)) == 1
