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
# # Fine-tuning a pretrained ViT as a reversible ViT
#
# Most ViTs people train start from a pretrained checkpoint, and fine-tuning (high resolution,
# video, dense prediction) is where activation memory hurts. revjax reads timm and big_vision
# ViT checkpoints into `revjax.ViT` (the same function as timm's model: logits agree to 1e-5),
# and `RevViT.from_vit` rewires the trained blocks into a reversible ViT (Re²TAL, Zhao et al.,
# CVPR 2023): each block's attention becomes F and its MLP G,
#
# ```
# y1 = x1 + attn(x2)        x2 = y2 - mlp(y1)
# y2 = x2 + mlp(y1)         x1 = y1 - attn(x2)
# ```
#
# so the backward rebuilds every block's input instead of storing it.
#
# This notebook
#
# 1. pretrains a tiny ViT on digits 0-4 and saves it in timm's format (`.safetensors`);
# 2. loads it back, converts it to a RevViT and fine-tunes it on digits 5-9 with a new head,
#    layer-wise learning-rate decay and a frozen embedding, against the same RevViT trained
#    from scratch for the same steps;
# 3. compares the compiled train-step memory of fine-tuning ViT-S/16 and ViT-B/16 as they are
#    and as RevViTs.
#
# **Quick mode** (`QUICK`, on without a GPU/TPU, and in CI through `REVJAX_QUICK=1`) trains
# fewer steps and compiles small stand-ins for the memory comparison.
#
# The outputs stored with this notebook (and shown in the documentation) are from one
# quick-mode run on a 2-core CPU (`python notebooks/execute.py`).

# %%
# Setup. In Colab this installs revjax from the repository (about a minute); anywhere else it
# assumes revjax is installed already (`pip install -e '.[experiments,pretrained]'`).
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
    packages = ["-e", f"{REPO_DIR}[experiments,pretrained]"]
    if shutil.which("nvidia-smi"):
        packages.append("jax[cuda12]>=0.10.2")  # keep the CUDA plugin in step with jax
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)
    sys.path.insert(0, REPO_DIR)  # importable without restarting the runtime
elif os.path.isdir("../experiments"):
    sys.path.insert(0, os.path.abspath(".."))  # run from notebooks/ in a checkout

import jax

# Quick mode: fewer steps and small memory stand-ins for a CPU (CI sets REVJAX_QUICK=1). Set
# QUICK = False to force the full sizes.
QUICK = os.environ.get("REVJAX_QUICK") == "1" or jax.default_backend() == "cpu"
print(f"jax {jax.__version__} on {jax.default_backend()}; QUICK = {QUICK}")

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import optax
from flax import nnx

import revjax
from revjax import data, finetune, pretrained, train
from revjax.finetune import accuracy, fit
from revjax.measure import compiled_memory

# %% [markdown]
# ## 1. Pretrain a tiny ViT on digits 0-4 and save it as a timm checkpoint
#
# `revjax.vit_tiny` on scikit-learn's 8x8 digits (patch 2, so 16 tokens, width 32, 2 blocks,
# 2 heads), with a class token (`pool="cls"`, timm's default layout), on `DigitsSource`'s
# train / test split (`data.digits_arrays`). `revjax.finetune.fit` is a plain optax loop over
# random batches. `pretrained.save_timm` writes timm's state dict: it loads into
# `timm.create_model(...)` with `load_state_dict`, and back into revjax with `load_timm`.

# %%
steps = dict(pretrain=150, finetune=60, batch=32) if QUICK else dict(
    pretrain=300, finetune=100, batch=64
)
lr = 3e-3
arch = dict(in_channels=1, num_classes=5, unroll=True)

x_old, y_old = data.digits_arrays("train", range(0, 5))
x_old_test, y_old_test = data.digits_arrays("test", range(0, 5))
x_new, y_new = data.digits_arrays("train", range(5, 10))
x_new_test, y_new_test = data.digits_arrays("test", range(5, 10))
print(f"digits 0-4: {len(y_old)} train / {len(y_old_test)} test; "
      f"digits 5-9: {len(y_new)} train / {len(y_new_test)} test")

source = revjax.vit_tiny(pool="cls", **arch, rngs=nnx.Rngs(0))
fit(source, optax.adamw(lr, weight_decay=0.05), x_old, y_old,
    steps=steps["pretrain"], batch=steps["batch"])
print(f"pretrained ViT, test accuracy on digits 0-4: {accuracy(source, x_old_test, y_old_test):.3f}")

workdir = Path(tempfile.mkdtemp())
checkpoint = pretrained.save_timm(source, workdir / "vit_digits04.safetensors")
print("saved", checkpoint)

# %% [markdown]
# ## 2. Load it back, convert to a RevViT, fine-tune on digits 5-9
#
# `load_timm` reads the architecture from the file (a state dict does not record the number of
# heads: timm's widths have a known count, others pass `num_heads`). Every mismatch (missing or
# unknown key, wrong shape, another architecture) is one `CheckpointMismatch` listing all
# differences; nothing is half-loaded.
#
# `RevViT.from_vit` copies the patch embedding, the position embedding and every block; its
# final LayerNorm over both streams and its head start from the ViT's. The new task has other
# classes, so the head is replaced by a fresh one. Fine-tuning options from `revjax.finetune`:
# `scale_by_layer_decay(0.75)` (block i of n learns at 0.75^(n-i) times the head's rate, the
# embeddings at 0.75^(n+1)) and `freeze(["embed"])` (patch and position embedding keep their
# pretrained values).

# %%
loaded = pretrained.load_timm(checkpoint, num_heads=2, unroll=True)
print(f"loaded: {type(loaded).__name__} pool={loaded.pool}, "
      f"{revjax.count_params(loaded):,} parameters")

target = revjax.RevViT.from_vit(loaded)
fresh_head = revjax.revvit_tiny(**arch, rngs=nnx.Rngs(1)).head
nnx.update(target.head, nnx.state(fresh_head, nnx.Param))  # a new head for digits 5-9
print(f"converted: {type(target).__name__}, {revjax.count_params(target):,} parameters")

finetune_tx = optax.chain(
    optax.adamw(lr, weight_decay=0.05),
    finetune.scale_by_layer_decay(0.75),
    finetune.freeze(["embed"]),
)
fit(target, finetune_tx, x_new, y_new, steps=steps["finetune"], batch=steps["batch"], seed=1)

scratch = revjax.revvit_tiny(**arch, rngs=nnx.Rngs(1))
fit(scratch, optax.adamw(lr, weight_decay=0.05), x_new, y_new,
    steps=steps["finetune"], batch=steps["batch"], seed=1)

acc = {
    "pretrained,\nconverted": accuracy(target, x_new_test, y_new_test),
    "from scratch": accuracy(scratch, x_new_test, y_new_test),
}
for name, value in acc.items():
    print(f"RevViT {name.replace(chr(10), ' ')}: test accuracy on digits 5-9 {value:.3f} "
          f"after {steps['finetune']} steps")

# %% [markdown]
# ## 3. Memory of fine-tuning: ViT vs its RevViT conversion
#
# The trainer's compiled train step (forward, backward, AdamW; abstract shapes, nothing is
# allocated; rolled scans as on a GPU/TPU) for ViT-S/16 and ViT-B/16 at 224x224 against the
# RevViT with the same blocks. Temporary bytes are the activations and the backward's working
# set. In quick mode eight-block, width-64 stand-ins at 64x64 (batch 8) are compiled instead.

# %%
recipe = dict(optimizer="adamw", weight_decay=0.05, layer_decay=0.75, freeze=("embed",))


def step_memory(preset, size, *, batch, classes, **overrides):
    """Compiled memory of the trainer's fine-tuning step for ``preset`` (nothing runs)."""
    config = train.TrainConfig(
        model=preset, model_overrides=dict(image_size=size, unroll=1, **overrides), **recipe
    )
    step, state, images = train.abstract_train_step(config, classes, 3, (size, size, 3), batch)
    return compiled_memory(step, state, images)


def measure_memory(pairs, size, *, batch, classes=1000, **small):
    return {
        (label, size): {
            "vit": step_memory(vit_preset, size, batch=batch, classes=classes, pool="cls",
                               **small),
            "rev": step_memory(rev_preset, size, batch=batch, classes=classes, **small),
        }
        for label, vit_preset, rev_preset in pairs
    }


if QUICK:
    memory = measure_memory([("ViT-S/16 stand-in", "vit_s16", "revvit_s16")], 64, batch=8,
                            classes=10, embed_dim=64, depth=8, num_heads=2)
else:
    memory = measure_memory(
        [("ViT-S/16", "vit_s16", "revvit_s16"), ("ViT-B/16", "vit_b16", "revvit_b16")],
        224, batch=32,
    )

fig, (ax_acc, ax_mem) = plt.subplots(1, 2, figsize=(10, 3.5))
ax_acc.bar(list(acc), list(acc.values()), color=["tab:green", "tab:gray"])
ax_acc.set_ylabel("test accuracy, digits 5-9")
ax_acc.set_ylim(0, 1)
ax_acc.set_title(f"after {steps['finetune']} fine-tuning steps")
labels = [f"{name}\n{size}x{size}" for name, size in memory]
width = 0.38
xs = range(len(labels))
ax_mem.bar([x - width / 2 for x in xs], [r["vit"]["temp"] / 2**20 for r in memory.values()],
           width, label="ViT")
ax_mem.bar([x + width / 2 for x in xs], [r["rev"]["temp"] / 2**20 for r in memory.values()],
           width, label="RevViT.from_vit")
ax_mem.set_xticks(list(xs), labels)
ax_mem.set_ylabel("train-step temp MiB")
ax_mem.set_title(f"compiled fine-tuning step ({jax.default_backend()})")
ax_mem.legend()
plt.tight_layout()
plt.show()
for (name, size), row in memory.items():
    print(f"{name} {size}x{size}: ViT {row['vit']['temp'] / 2**20:.1f} MiB, RevViT "
          f"{row['rev']['temp'] / 2**20:.1f} MiB ({row['rev']['temp'] / row['vit']['temp']:.2f}x)")

# %% [markdown]
# ## With a real checkpoint
#
# The same calls take timm's published weights: download `model.safetensors` of
# `timm/vit_small_patch16_224.augreg_in21k_ft_in1k` (or an AugReg / big_vision `.npz` for
# `pretrained.load_big_vision`), then
#
# ```python
# vit = pretrained.load_timm("model.safetensors", image_size=384, num_classes=102)
# rev = revjax.RevViT.from_vit(vit, dtype=jnp.bfloat16)
# ```
#
# `image_size=384` resamples the position embedding as timm does (bicubic); `num_classes=102`
# keeps a fresh head (the log says so). With the trainer, `init_from`, `layer_decay` and
# `freeze` in the `TrainConfig` do the same (see `experiments/configs/digits_revvit_finetune.py`).
# `pretrained.save_timm(vit, "out.safetensors")` writes a fine-tuned `ViT` back for timm.
