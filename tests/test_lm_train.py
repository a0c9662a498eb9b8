"""The trainer on a language model: a quick run on a small text, sampling from its checkpoint."""

from __future__ import annotations

import dataclasses

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
