"""Fine-tuning options: layer-wise learning-rate decay, frozen parts, weights from a file."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import revjax
from revjax import finetune, pretrained


@pytest.fixture(scope="module")
def vit():
    return revjax.vit_tiny(pool="cls", rngs=nnx.Rngs(0))  # depth 2


def _flat(state) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("kind", ["vit", "revvit"])
def test_layer_decay_scales(kind, vit):
    model = vit if kind == "vit" else revjax.RevViT.from_vit(vit)
    scales = _flat(finetune.layer_decay_scales(nnx.state(model, nnx.Param), 0.5))
    blocks = ("attn", "mlp") if kind == "vit" else ("blocks",)
    for path, s in scales.items():
        if path[0] in blocks:  # depth 2: block 0 at 0.5**2, block 1 at 0.5
            np.testing.assert_array_equal(s.reshape(-1), [0.25, 0.5])
        elif path[0] in finetune.EMBEDDING:
            assert s == 0.125, path
        else:
            assert s == 1.0, path


def test_layer_decay_refuses_models_without_blocks():
    params = nnx.state(revjax.revnet_tiny(rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="ViT"):
        finetune.layer_decay_scales(params, 0.7)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        finetune.scale_by_layer_decay(1.5)


def test_sgd_step_with_layer_decay_and_frozen_embedding(vit):
    """One SGD step: each update is -lr * scale * grad; the embedding does not move."""
    params = nnx.state(vit, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.chain(
        optax.sgd(0.1), finetune.scale_by_layer_decay(0.5), finetune.freeze(["embed"])
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = _flat(optax.apply_updates(params, updates))
    old = _flat(params)
    scales = _flat(finetune.layer_decay_scales(params, 0.5))
    for path in old:
        if path[0] in finetune.EMBEDDING:
            np.testing.assert_array_equal(new[path], old[path])
        else:
            np.testing.assert_allclose(
                new[path] - old[path], np.broadcast_to(-0.1 * scales[path], old[path].shape),
                rtol=1e-6, atol=1e-7,
            )


def test_freeze_mask_names_and_errors(vit):
    params = nnx.state(vit, nnx.Param)
    mask = _flat(finetune.freeze_mask(params, ["embed", "head"]))
    assert {p[0] for p, m in mask.items() if m} == {"patch_embed", "pos_embed", "cls_token", "head"}
    with pytest.raises(ValueError, match="no such part"):
        finetune.freeze_mask(params, ["stem"])


def test_init_from_file_into_vit_and_revvit(tmp_path, vit):
    path = pretrained.save_timm(vit, tmp_path / "vit.safetensors")
    fresh = revjax.vit_tiny(pool="cls", rngs=nnx.Rngs(9))
    finetune.init_from(fresh, path)
    assert all(np.array_equal(a, b) for a, b in zip(
        _flat(nnx.state(fresh, nnx.Param)).values(), _flat(nnx.state(vit, nnx.Param)).values()
    ))
    # A RevViT with another number of classes: blocks from the file, its own new head.
    rev = revjax.revvit_tiny(num_classes=5, rngs=nnx.Rngs(9))
    head = np.asarray(rev.head.kernel[...])
    finetune.init_from(rev, path)
    np.testing.assert_array_equal(rev.blocks.g.fc2.kernel[...], vit.mlp.fc2.kernel[...])
    np.testing.assert_array_equal(rev.pos_embed[...], vit.pos_embed[...][:, 1:])
    np.testing.assert_array_equal(rev.head.kernel[...], head)
    # Another architecture: the listed error, nothing loaded.
    wide = revjax.revvit_tiny(embed_dim=16, rngs=nnx.Rngs(9))
    with pytest.raises(pretrained.CheckpointMismatch, match="embed_dim"):
        finetune.init_from(wide, path)


def test_init_from_resamples_to_a_larger_image(tmp_path, vit):
    path = pretrained.save_timm(vit, tmp_path / "vit.safetensors")
    big = revjax.vit_tiny(pool="cls", image_size=16, rngs=nnx.Rngs(9))
    finetune.init_from(big, path)
    assert big.pos_embed.shape == (1, 1 + 64, 32)
    np.testing.assert_array_equal(big.pos_embed[...][:, 0], vit.pos_embed[...][:, 0])
    assert np.isfinite(np.asarray(big(jnp.ones((1, 16, 16, 3))))).all()


@pytest.mark.slow  # a benchmark script's quick run (experiments/, not the library)
def test_bench_finetune_quick_memory_table(tmp_path):
    from experiments import bench_finetune

    out = bench_finetune.main(["--quick", "--no-transfer", "--out-dir", str(tmp_path)])
    (row,) = out["memory"].values()
    assert row["rev"]["temp"] > 0 and row["vit"]["temp"] > 0
    text = (tmp_path / "bench_finetune.md").read_text()
    assert "python -m experiments.bench_finetune --quick --no-transfer" in text.splitlines()[0]
    assert "| ViT-S/16 | 32x32 |" in text


def test_bench_finetune_partial_run_leaves_committed_results_alone(tmp_path, monkeypatch, capsys):
    from experiments import bench_finetune

    monkeypatch.chdir(tmp_path)  # results/ would be here
    assert bench_finetune.main(["--quick", "--no-memory", "--no-transfer"]) == {
        "memory": None, "transfer": None
    }
    assert not (tmp_path / "results").exists()
    assert "a partial run writes no table" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The trainer's fine-tuning options
# --------------------------------------------------------------------------------------------


def test_trainer_fine_tunes_from_a_checkpoint(tmp_path, vit):
    """digits_revvit_finetune: the RevViT starts from the file's ViT (new 10-class head), one
    step moves the blocks but not the frozen embedding."""
    import dataclasses

    from experiments.configs.digits_revvit_finetune import get_config
    from revjax import train

    source = revjax.vit_tiny(pool="cls", in_channels=1, num_classes=5, rngs=nnx.Rngs(4))
    path = pretrained.save_timm(source, tmp_path / "digits04.safetensors")
    cfg = dataclasses.replace(  # no warmup: the first step moves
        get_config(quick=True), init_from=str(path), num_devices=1, warmup_steps=0
    )
    graphdef, state, tx = train.create_train_state(cfg, 10, 1)
    params = _flat(state.params)
    np.testing.assert_array_equal(
        params[("blocks", "f", "qkv", "kernel")], source.attn.qkv.kernel[...]
    )
    assert params[("head", "kernel")].shape == (64, 10)
    step = jax.jit(train.make_train_step(graphdef, tx))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.random((8, 8, 8, 1), np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    }
    new, _ = step(state, batch)
    after = _flat(new.params)
    for path_, value in params.items():
        moved = not np.array_equal(value, after[path_])
        assert moved == (path_[0] not in finetune.EMBEDDING), path_


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("init_from", "weights.ckpt", "checkpoint file path"),
        ("layer_decay", 1.5, "<= 1"),
        ("freeze", "embed", "tuple of part names"),
    ],
)
def test_trainer_rejects_bad_fine_tuning_options(field, value, expected):
    from revjax import train

    with pytest.raises(train.ConfigError, match=expected):
        train.TrainConfig(model="revvit_tiny", **{field: value})


def test_trainer_fine_tuning_needs_a_vit():
    from revjax import train

    with pytest.raises(train.ConfigError, match="need a ViT or RevViT preset"):
        train.TrainConfig(model="revnet38", layer_decay=0.75)
