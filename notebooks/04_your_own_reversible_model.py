# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
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
# # Reversible layers in your own model
#
# `revjax.ReversibleSequence` turns any pair of Flax NNX modules F and G into a stack of
# reversible units:
#
# ```
# y1 = x1 + F(x2, *context)
# y2 = x2 + G(y1, *context)
# ```
#
# The backward pass rebuilds every unit's input from its output (`x2 = y2 - G(y1)`,
# `x1 = y1 - F(x2)`) instead of storing it, so the activation memory of the whole stack does not
# grow with its depth. F and G can hold any NNX layer: `Linear`, `Conv`, `LayerNorm`,
# `BatchNorm` (statistics written back once per call), `Dropout` and drop-path (the backward
# recomputation replays the forward's random masks), `MultiHeadAttention`.
#
# In this notebook we
#
# 1. write F and G for a small conditioned sequence model (attention and an MLP, both modulated
#    by a time embedding given as a **context** input, which receives gradients),
# 2. check that the reversible gradients equal plain autodiff's (float64),
# 3. plot the compiled memory of a gradient step against depth.
#
# **Quick mode** (`QUICK`, on by default without a GPU/TPU, and in CI through `REVJAX_QUICK=1`)
# compiles the memory comparison at smaller sizes. The outputs stored with this notebook (and
# shown in the documentation) are from one quick-mode run on a 2-core CPU
# (`python notebooks/execute.py`).

# %%
# Setup. In Colab this clones the repository and installs revjax from it; anywhere else it
# assumes revjax is installed (`pip install -e '.[experiments]'` in a checkout).
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

import jax

# Quick mode: small sizes for a CPU (CI sets REVJAX_QUICK=1). Set QUICK = False to force the
# full sizes.
QUICK = os.environ.get("REVJAX_QUICK") == "1" or jax.default_backend() == "cpu"
print(f"jax {jax.__version__} on {jax.default_backend()}; QUICK = {QUICK}")

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
from flax import nnx

import revjax

# %% [markdown]
# ## 1. F and G: your own modules
#
# F and G are ordinary NNX modules. Each is called as `f(x, *context, **kwargs)`: the half it
# reads, then the context arrays, then static keyword options (`deterministic=` here). Its
# output must have the shape of the other half (a reversible unit cannot change shapes).
#
# Here F is pre-LayerNorm self-attention and G a pre-LayerNorm MLP with dropout, both
# modulated by a per-example time embedding `temb` (`[N, D]`), as in a diffusion transformer.


# %%
class Attention(nnx.Module):
    """F: LayerNorm, shift by the time embedding, multi-head self-attention."""

    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.shift = nnx.Linear(dim, dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, dropout_rate=0.1, decode=False, rngs=rngs)

    def __call__(self, x, temb, *, deterministic: bool):
        h = self.norm(x) + self.shift(temb)[:, None, :]  # [N, L, D]
        return self.attn(h, deterministic=deterministic)


class Mlp(nnx.Module):
    """G: LayerNorm, scale by the time embedding, MLP with dropout."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.scale = nnx.Linear(dim, dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x, temb, *, deterministic: bool):
        h = self.norm(x) * (1 + self.scale(temb)[:, None, :])
        h = self.dropout(jax.nn.gelu(self.up(h)), deterministic=deterministic)  # [N, L, 4D]
        return self.down(h)


# %% [markdown]
# ## 2. The reversible stack inside a model
#
# `ReversibleSequence(make_f, make_g, num_units, rngs=...)` builds `num_units` copies of F and G
# with independent weights (stacked on a leading axis: one `lax.scan`, one custom VJP, compile
# time independent of depth on GPU/TPU). Give the RNG streams F and G use (`dropout`) to
# `rngs`. The model around it is yours: here the tokens are embedded, duplicated into two
# streams (the halves), sent through the reversible stack and the streams averaged.


# %%
class Denoiser(nnx.Module):
    """A toy conditioned sequence model: tokens [N, L, F] and times [N] -> [N, L, F]."""

    def __init__(self, features: int, dim: int, heads: int, depth: int, *, rngs: nnx.Rngs):
        self.dim = dim
        self.embed = nnx.Linear(features, dim, rngs=rngs)
        self.time = nnx.Linear(dim, dim, rngs=rngs)
        self.blocks = revjax.ReversibleSequence(
            lambda r: Attention(dim, heads, r),
            lambda r: Mlp(dim, r),
            depth,
            rngs=rngs,
        )
        self.out = nnx.Linear(dim, features, rngs=rngs)

    def __call__(self, tokens, t, *, deterministic: bool = False):
        x = self.embed(tokens)  # [N, L, D]
        freqs = jnp.exp(-jnp.arange(self.dim // 2, dtype=x.dtype))  # [D/2]
        angles = t[:, None] * freqs[None, :]  # [N, D/2]
        temb = jax.nn.silu(self.time(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)))
        y1, y2 = self.blocks(x, x, temb, deterministic=deterministic)  # temb: the context
        return self.out((y1 + y2) / 2)


model = Denoiser(features=4, dim=32, heads=4, depth=6, rngs=nnx.Rngs(0, dropout=1))
tokens = jax.random.normal(jax.random.key(1), (8, 16, 4))  # [N, L, features]
times = jax.random.uniform(jax.random.key(2), (8,))
print(model(tokens, times).shape)
print(f"{revjax.count_params(model):,} parameters, {model.blocks.num_units} reversible units")

# %% [markdown]
# `temb` is computed from trainable weights (`self.time`), so its gradient, summed over all
# units' F and G, must reach them: `ReversibleSequence` passes context cotangents back like any
# other input.
#
# ## 3. Gradient check against plain autodiff
#
# `memory_saving=False` runs the same parameters through plain autodiff (every activation
# stored). In float64 the two gradients agree to rounding; dropout is on, and equal gradients
# show that the backward recomputation drew the forward's masks. Both models start from the
# same RNG state (`nnx.clone`), so they draw the same masks.

# %%
with jax.enable_x64(True):

    def float64(m):
        """The same model with float64 weights (NNX layers compute in their inputs' dtype)."""
        nnx.update(m, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(m, nnx.Param)))
        return m

    def loss(m, tokens, times):
        return jnp.mean(jnp.square(m(tokens, times) - tokens))

    grad_fn = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))
    reversible = float64(Denoiser(4, 32, 4, 6, rngs=nnx.Rngs(0, dropout=1)))
    plain = nnx.clone(reversible)  # same weights, same RNG state
    plain.blocks.memory_saving = False
    tokens64, times64 = tokens.astype(jnp.float64), times.astype(jnp.float64)
    g_rev = grad_fn(reversible, tokens64, times64)
    g_plain = grad_fn(plain, tokens64, times64)
    for name, a, b in zip(["parameters", "tokens", "times"], g_rev, g_plain):
        print(f"{name:>10}: relative difference {float(revjax.relative_error(a, b)):.1e}")
    assert float(revjax.relative_error(g_rev, g_plain)) < 1e-10

# %% [markdown]
# ## 4. Memory against depth
#
# We compile one gradient step per depth and read XLA's `memory_analysis()`: the temporary
# bytes (activations and other buffers live during the step; parameters and their gradients
# are arguments and outputs). Nothing runs, so shapes are enough (`nnx.eval_shape`). The scan
# is kept rolled (`unroll=1`, the GPU/TPU default) so compile time stays independent of depth.

# %%
from revjax.measure import compiled_memory

if QUICK:
    batch, length, dim, depths = 8, 64, 32, [2, 4, 8, 16]
else:
    batch, length, dim, depths = 32, 256, 128, [2, 4, 8, 16, 32, 64]


def step_temp_bytes(depth: int, memory_saving: bool) -> int:
    abstract = nnx.eval_shape(lambda: Denoiser(4, dim, 4, depth, rngs=nnx.Rngs(0, dropout=1)))
    abstract.blocks.memory_saving = memory_saving
    abstract.blocks.unroll = 1
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)  # rest: RNG state

    def loss(params, rest, tokens, times):
        m = nnx.merge(graphdef, params, rest, copy=True)  # a fresh module inside the trace
        return jnp.mean(jnp.square(m(tokens, times) - tokens))

    tokens = jax.ShapeDtypeStruct((batch, length, 4), jnp.float32)
    times = jax.ShapeDtypeStruct((batch,), jnp.float32)
    return compiled_memory(jax.grad(loss), params, rest, tokens, times)["temp"]


temp = {
    mode: [step_temp_bytes(d, mode == "reversible") / 2**20 for d in depths]
    for mode in ("reversible", "plain autodiff")
}
print("units  " + "  ".join(f"{mode:>15}" for mode in temp))
for i, d in enumerate(depths):
    print(f"{d:5d}  " + "  ".join(f"{temp[mode][i]:11.1f} MiB" for mode in temp))

fig, ax = plt.subplots(figsize=(6, 4))
for mode, style in (("reversible", "o-"), ("plain autodiff", "s--")):
    ax.plot(depths, temp[mode], style, label=mode)
ax.set_xlabel("reversible units")
ax.set_ylabel("compiled temp memory of a gradient step (MiB)")
ax.set_title(f"batch {batch}, {length} tokens, width {dim}")
ax.set_ylim(bottom=0)
ax.grid(alpha=0.3)
ax.legend()
plt.show()
assert temp["reversible"][-1] <= 1.10 * temp["reversible"][0]

# %% [markdown]
# The reversible stack's memory stays flat while plain autodiff stores every unit's
# activations (its attention weights are `[N, heads, L, L]` per unit).
#
# ## Checklist for your own model
#
# - **Halves.** F maps `x2` to the shape of `x1`, G maps `y1` to the shape of `x2`. Split the
#   channels (`revjax.split_halves` / `revjax.merge_halves`) or duplicate the input as above; a
#   shape-changing layer (stride, pooling, a width change) goes outside the sequence.
# - **Call.** `seq(x1, x2, *context, **kwargs)`: `context` are arrays (or pytrees of arrays)
#   shared by every unit; their floating leaves get gradients (summed over units), boolean or
#   integer ones (masks, positions) get none. `kwargs` are static Python values (`train=True`,
#   `deterministic=False`).
# - **State and randomness.** BatchNorm statistics and RNG counters are written back once per
#   call, from the forward pass. Give dropout layers their `rngs` at construction (not at call
#   time), and a `dropout` stream to the sequence's `rngs`.
# - **Couplings.** `coupling="affine"`: F and G return `(log_scale, shift)` and
#   `y = x * exp(tanh(log_scale)) + shift`.
# - **Deep float32 stacks.** Rounding error of the rebuilt activations accumulates over units;
#   `exact_every=k` stores every k-th unit's input to bound it (see
#   `notebooks/03_memory_and_drift.ipynb`).
# - **Debugging.** `seq.memory_saving = False` runs the same weights through plain autodiff.
