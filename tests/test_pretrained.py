"""Pretrained ViTs: timm and big_vision checkpoints compute timm's function in revjax.

timm and torch are test-only (the ``test`` extra): the reference is timm's own model with
random weights (``pretrained=False``, no network), its own position-embedding resampling
(``checkpoint_filter_fn``) and its own ``.npz`` reader (``load_pretrained``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import pretrained

_REFERENCE = "timm's ViT is the reference: make test-all (pip install -e '.[test-all]')"
torch = pytest.importorskip("torch", reason=_REFERENCE)
timm = pytest.importorskip("timm", reason=_REFERENCE)

TOL = 1e-5  # float32 logits, relative to the largest logit


def _timm_model(name: str, seed: int = 0, **kwargs):
    """A timm ViT in eval mode with random weights: every parameter (biases, class token and
    norms included) perturbed, so no zero-initialised part hides a layout error."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _timm_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _logits(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))  # NCHW -> NHWC


def _assert_close(ours, ref):
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err < TOL, f"relative logit difference {err:.2e} >= {TOL}"


@pytest.fixture(scope="module")
def tiny_token():
    return _timm_model("vit_tiny_patch16_224")


@pytest.mark.parametrize(
    "global_pool, pool", [("token", "cls"), ("avg", "avg")], ids=["token", "avg"]
)
def test_vit_tiny_logits_equal_timm(global_pool, pool, tiny_token):
    model = tiny_token if global_pool == "token" else _timm_model(
        "vit_tiny_patch16_224", global_pool="avg"
    )
    x = _images(224)
    ours = pretrained.load_timm(_state(model), unroll=1)
    assert ours.pool == pool and ours.num_heads == 3 and ours.depth == 12
    _assert_close(_logits(ours, x), _timm_logits(model, x))


def test_small_384_logits_and_resampling_equal_timm():
    """A 2-block ViT-S/16 at 384x384: loaded directly, and resampled from its 224 twin exactly
    as timm's checkpoint_filter_fn does (bicubic, antialiased)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    m384 = _timm_model("vit_small_patch16_384", depth=2)
    x = _images(384, n=1)
    ours = pretrained.load_timm(_state(m384), unroll=1)
    assert (ours.image_size, ours.embed_dim, ours.num_heads) == (384, 384, 6)
    _assert_close(_logits(ours, x), _timm_logits(m384, x))

    m224 = _timm_model("vit_small_patch16_224", depth=2, seed=1)
    resized = checkpoint_filter_fn(m224.state_dict(), m384)
    m384.load_state_dict(resized)
    ours = pretrained.load_timm(_state(m224), image_size=384, unroll=1)
    np.testing.assert_allclose(
        np.asarray(ours.pos_embed[...]), resized["pos_embed"].numpy(), rtol=0, atol=1e-6
    )
    _assert_close(_logits(ours, x), _timm_logits(m384, x))


def test_round_trip_revjax_timm_revjax_is_exact(tiny_token):
    ours = pretrained.load_timm(_state(tiny_token), unroll=1)
    exported = pretrained.timm_state_dict(ours)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    back = pretrained.load_timm(_state(theirs), unroll=1)
    a = nnx.to_flat_state(nnx.state(ours, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    for path, value in a:
        assert np.array_equal(value[...], b[path][...]), path


def test_mean_pool_round_trip_with_timm_no_class_token():
    """revjax pool='mean' is timm's class_token=False, global_pool='avg', fc_norm=False."""
    model = revjax.vit_tiny(pool="mean", in_channels=3, rngs=nnx.Rngs(3))
    theirs = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32,
        depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10, class_token=False,
        global_pool="avg", fc_norm=False,
    ).eval()
    exported = pretrained.timm_state_dict(model)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    x = _images(8, n=4)
    _assert_close(_logits(model, x), _timm_logits(theirs, x))


def test_safetensors_file_loads_without_torch(tmp_path, tiny_token):
    model = pretrained.load_timm(_state(tiny_token))
    path = pretrained.save_timm(model, tmp_path / "m.safetensors")
    x = _images(224, n=1)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from revjax import pretrained
        model = pretrained.load_timm({str(path)!r}, unroll=1)
        x = np.load({str(tmp_path / "x.npy")!r}).transpose(0, 2, 3, 1)
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(model(x)))
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        """
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_close(np.load(tmp_path / "out.npy"), _timm_logits(tiny_token, x))


def test_torch_file_loads_and_pickled_objects_are_refused(tmp_path):
    model = _timm_model("vit_tiny_patch16_224", depth=1)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ok.pth")
    assert pretrained.read_checkpoint(tmp_path / "ok.pth").keys() == model.state_dict().keys()
    # A training checkpoint with its argparse Namespace (as timm's train.py writes them).
    bad = {"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="safetensors"):
        pretrained.read_checkpoint(tmp_path / "bad.pth")


# --------------------------------------------------------------------------------------------
# big_vision / AugReg .npz, checked against timm's own reader
# --------------------------------------------------------------------------------------------


def _to_npz_layout(state: dict, heads: int, *, big_vision: bool, scanned: bool, prefix: str):
    """Writes a timm state dict in the published Flax layouts (the inverse of timm's reader)."""
    d = state["patch_embed.proj.weight"].shape[0]
    out = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": state["head.weight"].T,
        "head/bias": state["head.bias"],
    }
    if "cls_token" in state:
        out["cls"] = state["cls_token"]
    if big_vision:
        out["pos_embedding"] = state["pos_embed"]  # no class token here (timm: class_token=False)
    else:
        out["Transformer/posembed_input/pos_embedding"] = state["pos_embed"]
    mha, ln2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    blocks = []
    for i in range(depth):
        s = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        qkv_w = s["attn.qkv.weight"].reshape(3, heads, d // heads, d)
        qkv_b = s["attn.qkv.bias"].reshape(3, heads, d // heads)
        att = f"MultiHeadDotProductAttention_{mha}/"
        block = {
            "LayerNorm_0/scale": s["norm1.weight"], "LayerNorm_0/bias": s["norm1.bias"],
            f"{att}out/kernel": s["attn.proj.weight"].T.reshape(heads, d // heads, d),
            f"{att}out/bias": s["attn.proj.bias"],
            f"LayerNorm_{ln2}/scale": s["norm2.weight"], f"LayerNorm_{ln2}/bias": s["norm2.bias"],
        }
        for j, n in enumerate(("query", "key", "value")):
            block[f"{att}{n}/kernel"] = qkv_w[j].transpose(2, 0, 1)  # [D, heads, head_dim]
            block[f"{att}{n}/bias"] = qkv_b[j]
        for r in (0, 1):
            block[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = s[f"mlp.fc{r + 1}.weight"].T
            block[f"MlpBlock_{mlp}/Dense_{r}/bias"] = s[f"mlp.fc{r + 1}.bias"]
        blocks.append(block)
    if scanned:
        for k in blocks[0]:
            out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


@pytest.mark.parametrize(
    "layout",
    [
        dict(big_vision=False, scanned=False, prefix="", kw={}),
        dict(big_vision=True, scanned=True, prefix="params/",
             kw=dict(class_token=False, global_pool="avg", fc_norm=False)),
    ],
    ids=["augreg", "big_vision_scanned_gap"],
)
def test_npz_loads_like_timm_reads_it(tmp_path, layout):
    kw = dict(depth=2, **layout["kw"])
    source = _timm_model("vit_tiny_patch16_224", seed=2, **kw)
    npz = _to_npz_layout(
        _state(source), 3, big_vision=layout["big_vision"], scanned=layout["scanned"],
        prefix=layout["prefix"],
    )
    path = tmp_path / "vit.npz"
    np.savez(path, **npz)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    theirs.load_pretrained(str(path))  # timm's own .npz reader
    ours = pretrained.load_big_vision(path, unroll=1)
    assert ours.pool == ("mean" if layout["big_vision"] else "cls")
    x = _images(224, n=1)
    _assert_close(_logits(ours, x), _timm_logits(theirs, x))
    _assert_close(_logits(ours, x), _timm_logits(source, x))


def test_npz_unknown_and_missing_keys_are_listed():
    npz = _to_npz_layout(
        _state(_timm_model("vit_tiny_patch16_224", depth=1)), 3, big_vision=False,
        scanned=False, prefix="",
    )
    npz["pre_logits/kernel"] = np.zeros((192, 192), np.float32)
    del npz["Transformer/encoderblock_0/LayerNorm_2/bias"]
    with pytest.raises(pretrained.CheckpointMismatch) as err:
        pretrained.load_big_vision(npz)
    assert len(err.value.differences) == 2
    assert "pre_logits/kernel" in str(err.value) and "LayerNorm_2/bias" in str(err.value)


# --------------------------------------------------------------------------------------------
# Mismatches, new heads, conversion
# --------------------------------------------------------------------------------------------


def test_missing_extra_and_misshapen_keys_are_all_listed(tiny_token):
    state = _state(tiny_token)
    del state["blocks.3.norm2.bias"]
    state["blocks.0.ls1.gamma"] = np.ones(192, np.float32)
    state["blocks.5.attn.proj.weight"] = np.zeros((192, 191), np.float32)
    model = revjax.vit_ti16(pool="cls", rngs=nnx.Rngs(0))
    before = np.asarray(model.attn.qkv.kernel[...])
    with pytest.raises(pretrained.CheckpointMismatch) as err:
        pretrained.load_vit_weights(model, state)
    text = str(err.value)
    assert len(err.value.differences) == 3, text
    assert "missing key 'blocks.3.norm2.bias'" in text
    assert "unknown key 'blocks.0.ls1.gamma'" in text
    assert "'blocks.5.attn.proj.weight' has shape (192, 191), expected (192, 192)" in text
    assert np.array_equal(before, model.attn.qkv.kernel[...])  # nothing was loaded


def test_architecture_mismatch_is_listed(tiny_token):
    model = revjax.ViT(
        image_size=224, patch_size=16, embed_dim=192, depth=6, num_heads=3, pool="mean",
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(pretrained.CheckpointMismatch) as err:
        pretrained.load_vit_weights(model, _state(tiny_token))
    assert {d.split(":")[0] for d in err.value.differences} == {"depth", "pool"}


def test_new_head_is_reinitialised_and_logged(tiny_token, caplog):
    with caplog.at_level(logging.WARNING, logger="revjax.pretrained"):
        model = pretrained.load_timm(_state(tiny_token), num_classes=7, rngs=nnx.Rngs(5))
    assert model.head.kernel.shape == (192, 7)
    assert "head is not loaded" in caplog.text and "1000 classes" in caplog.text
    fresh = revjax.vit_ti16(num_classes=7, pool="cls", rngs=nnx.Rngs(5))
    assert np.array_equal(model.head.kernel[...], fresh.head.kernel[...])
    assert np.array_equal(model.norm.scale[...], tiny_token.norm.weight.detach().numpy())


def test_rev_vit_from_vit_copies_every_block_parameter(tiny_token):
    vit = pretrained.load_timm(_state(tiny_token), unroll=1)
    rev = revjax.RevViT.from_vit(vit, memory_saving=True)
    for ours, theirs in ((rev.blocks.f, vit.attn), (rev.blocks.g, vit.mlp)):
        got = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
        want = nnx.to_flat_state(nnx.state(theirs, nnx.Param))
        assert len(got) == len(want) == 6
        for path, value in want:
            assert np.array_equal(got[path][...], value[...]), path
    assert np.array_equal(rev.patch_embed.conv.kernel[...], vit.patch_embed.conv.kernel[...])
    assert np.array_equal(rev.pos_embed[...], vit.pos_embed[...][:, 1:])
    assert np.array_equal(rev.norm.scale[...], np.tile(vit.norm.scale[...], 2))
    assert np.allclose(rev.head.kernel[...], np.concatenate([vit.head.kernel[...]] * 2) / 2)
    # New: the head's second half and the norm's; gone: the class token and its position.
    new, gone = 192 * 1000 + 2 * 192, 192 + 192
    assert revjax.count_params(rev) == revjax.count_params(vit) + new - gone
    x = jnp.asarray(_images(224, n=1).transpose(0, 2, 3, 1))
    assert np.all(np.isfinite(np.asarray(rev(x))))


def test_bfloat16_safetensors_loads(tmp_path, tiny_token):
    from safetensors.torch import save_file

    half = {k: v.to(torch.bfloat16).contiguous() for k, v in tiny_token.state_dict().items()}
    save_file(half, tmp_path / "bf16.safetensors")
    model = pretrained.load_timm(tmp_path / "bf16.safetensors", unroll=1)
    want = half["blocks.2.mlp.fc1.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.mlp.fc1.kernel[...][2]), want)
