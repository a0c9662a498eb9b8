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
# # revjax quickstart: backpropagation without storing activations
#
# A reversible unit splits its input into halves and computes
#
# ```
# y1 = x1 + F(x2)        x2 = y2 - G(y1)
# y2 = x2 + G(y1)        x1 = y1 - F(x2)
# ```
#
# so the backward pass rebuilds every activation from the unit's output instead of storing it
# (Gomez, Ren, Urtasun & Grosse, *The Reversible Residual Network*, NeurIPS 2017).
#
# This notebook
#
# 1. runs a sequence of reversible units with `revjax.reversible_sequence` and builds a `RevNet`;
# 2. checks that the reversible gradients equal plain autodiff's (float64);
# 3. plots train-step memory against depth: RevNet flat, ResNet growing;
# 4. inverts a RevNet stage: rebuilds its input from its output.
#
# **Quick mode** (`QUICK`, on by default without a GPU/TPU, and in CI through `REVJAX_QUICK=1`)
# shrinks every model so the notebook runs in about a minute on a CPU. In Colab choose
# *Runtime > Change runtime type > GPU* for the full sizes.
#
# The outputs stored with this notebook (and shown in the documentation) are from one
# quick-mode run on a 2-core CPU (`python notebooks/execute.py`).

# %%
# Setup. In Colab this installs revjax from the repository (about a minute); anywhere else it
# assumes revjax is installed already (`pip install -e '.[experiments]'` in a checkout).
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

import jax

# Quick mode: tiny sizes for a CPU (CI sets REVJAX_QUICK=1). Set QUICK = False to force the
# full sizes.
QUICK = os.environ.get("REVJAX_QUICK") == "1" or jax.default_backend() == "cpu"
print(f"jax {jax.__version__} on {jax.default_backend()}; QUICK = {QUICK}")

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx

import revjax
from revjax.measure import compiled_memory

print("revjax", revjax.__version__)

# %% [markdown]
# ## 1. A sequence of reversible units
#
# `reversible_sequence(f, g, f_params, g_params, x1, x2)` applies n units whose parameters are
# stacked on a leading axis of length n. `f(params, x2)` returns something shaped like `x1`,
# `g(params, y1)` something shaped like `x2`. Here F and G are small dense layers.

# %%
num_units, batch, dim = 6, 4, 8
k_f, k_g, k_x = jax.random.split(jax.random.key(0), 3)


def dense(params, x):
    """A residual function: tanh(x W + b), with W [dim, dim]."""
    return jnp.tanh(x @ params["w"] + params["b"])


def init(key):
    """Parameters of ``num_units`` dense layers, stacked on a leading axis."""
    w = jax.random.normal(key, (num_units, dim, dim)) / jnp.sqrt(dim)
    return {"w": w, "b": jnp.zeros((num_units, dim))}


f_params, g_params = init(k_f), init(k_g)
x1, x2 = jax.random.normal(k_x, (2, batch, dim))


@jax.jit
def forward_and_back(f_params, g_params, x1, x2):
    y1, y2 = revjax.reversible_sequence(dense, dense, f_params, g_params, x1, x2)
    r1, r2 = revjax.inverse_sequence(dense, dense, f_params, g_params, y1, y2)
    return y1, y2, r1, r2


y1, y2, r1, r2 = forward_and_back(f_params, g_params, x1, x2)
print("output halves:", y1.shape, y2.shape)
print(
    "input rebuilt from the output, max abs error:",
    float(jnp.maximum(jnp.abs(r1 - x1).max(), jnp.abs(r2 - x2).max())),
)

# %% [markdown]
# ## 2. A RevNet
#
# `revjax.RevNet` is a Flax NNX module: a stem, stages of units (each stage: one entry unit that
# may downsample and widen, then reversible units run through one `reversible_sequence`) and a
# head. `revjax.revnet38` is the paper's CIFAR model; in quick mode we build a two-stage RevNet
# with the same structure and a few hundred parameters per layer.

# %%
if QUICK:
    make_revnet = lambda **kw: revjax.RevNet(
        units_per_stage=(3, 3), widths=(8, 8, 16), rngs=nnx.Rngs(0), **kw
    )
    image_size = 16
else:
    make_revnet = lambda **kw: revjax.revnet38(rngs=nnx.Rngs(0), **kw)
    image_size = 32

model = make_revnet()
images = jax.random.normal(jax.random.key(1), (8, image_size, image_size, 3))
labels = jnp.arange(8) % 10
logits = nnx.jit(lambda model, x: model(x, train=False))(model, images)
print(f"{revjax.count_params(model):,} parameters; logits {logits.shape}")

# %% [markdown]
# ## 3. Reversible gradients equal plain autodiff
#
# `memory_saving=False` runs the same parameters through ordinary autodiff (which stores every
# activation). In float64 the two gradients agree to about 1e-10 relative: the reconstruction
# only adds rounding error. `revjax.functional` splits the model once into a static `graphdef`
# and pytrees of parameters and BatchNorm statistics, `revjax.apply` runs it as a pure function.

# %%
with jax.enable_x64(True):
    model64 = make_revnet(param_dtype=jnp.float64)
    images64 = images.astype(jnp.float64)
    graphdef, params, batch_stats = revjax.functional(model64)
    model64.memory_saving = False
    graphdef_plain, _, _ = revjax.functional(model64)

    def loss_fn(graphdef):
        def loss(params):
            logits, _ = revjax.apply(graphdef, params, batch_stats, images64, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return loss

    loss_rev, grads_rev = jax.jit(jax.value_and_grad(loss_fn(graphdef)))(params)
    loss_plain, grads_plain = jax.jit(jax.value_and_grad(loss_fn(graphdef_plain)))(params)
    grad_error = float(revjax.relative_error(grads_rev, grads_plain))

print(f"loss: reversible {float(loss_rev):.12f}, plain {float(loss_plain):.12f}")
print(f"relative error of the reversible gradients (float64): {grad_error:.2e}")
assert grad_error < 1e-8

# %% [markdown]
# ## 4. Memory against depth
#
# We compile one training step's gradient on abstract shapes (nothing is allocated) and read
# XLA's temporary bytes (`memory_analysis()`) for a RevNet, the same RevNet with memory saving
# off, and its ResNet twin, at growing units per stage. Scans are compiled rolled
# (`unroll=1`), as on a GPU/TPU. The RevNet stores only each stage's entry unit and output, so
# its line stays flat; the others store every unit's activations.

# %%
if QUICK:
    depths, widths, mem_batch, mem_size = [2, 3, 4], (4, 8), 4, 8
else:
    depths, widths, mem_batch, mem_size = [1, 2, 3, 5, 7, 9], (32, 32, 64, 128), 128, 32

# Compiling with XLA:CPU backend optimisation off gives the same bytes, faster.
compile_options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def grad_temp_bytes(cls, units, **overrides):
    """Compiled temporary bytes of the loss gradient of ``cls`` with ``units`` per stage."""
    model = nnx.eval_shape(
        lambda: cls(
            units_per_stage=(units,) * (len(widths) - 1),
            widths=widths,
            unroll=1,
            rngs=nnx.Rngs(0),
            **overrides,
        )
    )
    graphdef, params, batch_stats = revjax.functional(model)
    x = jax.ShapeDtypeStruct((mem_batch, mem_size, mem_size, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((mem_batch,), jnp.int32)

    def loss(params, batch_stats, x, y):
        logits, _ = revjax.apply(graphdef, params, batch_stats, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    lowered = jax.jit(jax.grad(loss)).lower(params, batch_stats, x, y)
    return compiled_memory(lowered.compile(compiler_options=compile_options))["temp"]


lines = {
    "RevNet": (revjax.RevNet, {}),
    "RevNet, memory saving off": (revjax.RevNet, {"memory_saving": False}),
    "ResNet twin": (revjax.ResNet, {}),
}
memory = {
    label: [grad_temp_bytes(cls, units, **kw) for units in depths]
    for label, (cls, kw) in lines.items()
}
for label, values in memory.items():
    print(f"{label:>26}: " + ", ".join(f"{v / 2**10:,.0f}" for v in values) + " KiB")

# %%
unit, div = ("KiB", 2**10) if QUICK else ("MiB", 2**20)
fig, ax = plt.subplots(figsize=(6.5, 4))
for (label, values), marker in zip(memory.items(), "osD"):
    ax.plot(depths, [v / div for v in values], marker=marker, label=label)
ax.set_xlabel("units per stage")
ax.set_ylabel(f"compiled temporary memory ({unit})")
ax.set_title(f"Gradient memory vs depth, batch {mem_batch}, {mem_size}x{mem_size} images")
ax.set_ylim(bottom=0)
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## 5. Inverting a stage
#
# A RevNet stage is an entry unit (which downsamples, so it is not invertible and stores its
# input) followed by a `revjax.ReversibleSequence` of reversible units whose F and G parameters
# are stacked (`stage.reversible.f`, `stage.reversible.g`). We run the second stage's reversible units forward with `reversible_sequence`,
# then rebuild their input from their output with `revjax.inverse_sequence`. BatchNorm uses its
# running averages here (`train=False`), so F and G are fixed functions.


# %%
@nnx.jit
def invert_stage(model, images):
    """Runs stage 2's reversible units forward, then rebuilds their input from their output."""
    stage = model.stages[1]
    h1, h2 = model.stem_halves(images, train=False)  # [N, H, W, C/2] each
    h1, h2 = model.stages[0](h1, h2, train=False)
    x1, x2 = stage.entry(h1, h2, train=False)  # the input of the stage's reversible units

    f_def, f_state = nnx.split(stage.reversible.f)  # parameters stacked over the units
    g_def, g_state = nnx.split(stage.reversible.g)
    f = lambda state, x: nnx.merge(f_def, state, copy=True)(x, train=False)
    g = lambda state, x: nnx.merge(g_def, state, copy=True)(x, train=False)

    y1, y2 = revjax.reversible_sequence(f, g, f_state, g_state, x1, x2)
    r1, r2 = revjax.inverse_sequence(f, g, f_state, g_state, y1, y2)
    s1, _ = stage(h1, h2, train=False)  # the stage itself gives the same output
    return (x1, x2), (y1, y2), (r1, r2), s1


(x1, x2), (y1, y2), (r1, r2), s1 = invert_stage(model, images)
stage = model.stages[1]
print(f"{stage.num_reversible} reversible units, halves {x1.shape}")
print("stage output vs reversible_sequence:", float(jnp.abs(s1 - y1).max()))
reconstruction_error = float(jnp.maximum(jnp.abs(r1 - x1).max(), jnp.abs(r2 - x2).max()))
print(f"max abs reconstruction error (float32): {reconstruction_error:.2e}")
print(f"largest activation: {float(jnp.maximum(jnp.abs(x1).max(), jnp.abs(x2).max())):.2f}")
assert reconstruction_error < 1e-3

# %% [markdown]
# The rebuilt input differs from the real one only by float32 rounding. Over many units (and
# through BatchNorm in training mode) this error can grow; `notebooks/03_memory_and_drift.ipynb`
# measures that drift. Next: `notebooks/02_train_cifar10.ipynb` trains RevNet-38 on CIFAR-10.
