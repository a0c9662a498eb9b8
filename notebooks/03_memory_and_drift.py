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
# # Memory and drift of reversible networks
#
# Two benchmarks from `experiments/`, run interactively:
#
# 1. **Memory vs depth** (`experiments/bench_memory.py`): train-step memory of a RevNet, the
#    same RevNet with memory saving off, the RevNet with rematerialised transition units, its
#    ResNet twin and the ResNet with a checkpoint around every unit, as the number of units per
#    stage grows. The RevNet's line is flat.
# 2. **Numerical drift** (`experiments/bench_drift.py`, `revjax.drift`): the backward pass
#    rebuilds each unit's input from its output, so float32 rounding accumulates from the last
#    unit of a stage back to the first. How large is the error of the rebuilt activations, and
#    how far do the reversible gradients move from plain autodiff and from a float64 reference?
#
# The command-line versions write Markdown tables and PNGs to `results/`
# (`python -m experiments.bench_memory`, `python -m experiments.bench_drift`).
#
# **Quick mode** (`QUICK`, on by default without a GPU/TPU, and in CI through `REVJAX_QUICK=1`)
# runs each benchmark at tiny sizes (the memory benchmark with three of its five lines).
# In Colab choose *Runtime > Change runtime type > GPU* for the full sweeps (each takes several
# minutes; on a GPU the memory benchmark also reads the device's peak memory in fresh worker
# processes).
#
# The outputs stored with this notebook (and shown in the documentation) are from one
# quick-mode run on a 2-core CPU (`python notebooks/execute.py`); the full tables are in
# `results/bench_memory.md` and `results/bench_drift.md`.

# %%
# Setup. In Colab this clones the repository (for `experiments/`, the benchmarks) and installs
# revjax from it; anywhere else it assumes revjax is installed (`pip install -e '.[experiments]'`
# in a checkout) and finds `experiments/` next to this notebook.
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
else:
    REPO_DIR = os.path.dirname(os.getcwd())  # a checkout: notebooks/ sits next to experiments/
if os.path.isdir(os.path.join(REPO_DIR, "experiments")) and REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)  # importable without restarting the runtime

# The memory benchmark's device-peak workers need the GPU: don't let this process reserve 75%
# of it when JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax

# Quick mode: tiny sizes for a CPU (CI sets REVJAX_QUICK=1). Set QUICK = False to force the
# full sweeps.
QUICK = os.environ.get("REVJAX_QUICK") == "1" or jax.default_backend() == "cpu"
print(f"jax {jax.__version__} on {jax.default_backend()}; QUICK = {QUICK}")

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

from experiments import bench_drift, bench_memory

OUT_DIR = Path("results_notebook")  # the PNGs the benchmarks write
OUT_DIR.mkdir(exist_ok=True)

# %% [markdown]
# ## 1. Memory vs depth
#
# Every line compiles the trainer's full train step (forward, backward, SGD + momentum update,
# BatchNorm statistics) on abstract shapes and reads XLA's temporary bytes
# (`memory_analysis()`); nothing is allocated. Scans are compiled rolled (`unroll=1`), the
# GPU/TPU configuration. On a GPU/TPU each configuration also runs once in a fresh process and
# reports the allocator's peak (`device_peak=True`), and the plot shows that instead.

# %%
memory_config = dict(bench_memory.QUICK if QUICK else bench_memory.FULL)
if not QUICK:
    memory_config["depths"] = [1, 2, 4, 6, 9, 12, 18]  # fewer points than the CLI's 1..18
# Quick mode: the three lines that tell the story (RevNet, memory saving off, ResNet twin).
lines = ["rev", "rev_plain", "res"] if QUICK else list(bench_memory.LINES)
device_peak = jax.default_backend() != "cpu"
print(memory_config, lines, "device peak:", device_peak)

if device_peak:  # every line, each in a fresh worker process
    memory = bench_memory.run(memory_config, device_peak=True, worker_timeout=900)
else:
    memory = {
        key: bench_memory.measure_line(key, **memory_config, device_peak=False) for key in lines
    }

# %%
display(Markdown(bench_memory.to_markdown(memory, "**Train-step memory vs depth**")))
size = f"{memory_config['size']}x{memory_config['size']}"
png = bench_memory.plot(
    memory,
    OUT_DIR / "bench_memory.png",
    f"Train-step memory vs depth, batch {memory_config['batch']}, {size}",
)
display(Image(filename=str(png)))

# %% [markdown]
# The slope row is the headline: bytes added per extra unit per stage. The RevNet's is (near)
# zero; plain autodiff through the same parameters grows like the ResNet twin. At the full
# sizes, a checkpoint around every ResNet unit still stores one activation per unit.

# %%
slopes = bench_memory.slopes(memory)
for key, slope in slopes.items():
    print(f"{bench_memory.LINES[key][0]:>30}: {slope / 2**10:10,.1f} KiB per unit per stage")

# %% [markdown]
# ## 2. Numerical drift
#
# One RevNet stage of basic units on scikit-learn's digits (8x8 images, batch 16, BatchNorm in
# train mode, as in the backward's recomputation), at initialisation and after a few SGD steps.
# For each depth `bench_drift.measure_depth` measures:
#
# - `revjax.drift.reconstruction_error`: the rebuilt unit inputs against the stored ones;
# - `revjax.drift.gradient_agreement`: the reversible float32 gradients against plain float32
#   autodiff on the same weights and against float64, and the same with bfloat16 compute.
#
# The full sweep (up to 64 units per stage, plus the options table: BatchNorm epsilon and
# variance, `exact_every`, bfloat16 carries) takes several minutes; quick mode measures the
# benchmark's `--quick` settings (the smallest depth and three of the options).

# %%
# The same settings as `python -m experiments.bench_drift` (with `--quick` in quick mode).
drift_depths = bench_drift.QUICK_DEPTHS if QUICK else bench_drift.DEPTHS
option_depths = bench_drift.QUICK_OPTION_DEPTHS if QUICK else bench_drift.OPTION_DEPTHS
option_names = bench_drift.QUICK_OPTIONS if QUICK else tuple(bench_drift.OPTIONS)
per_unit_depth = max(drift_depths) if QUICK else 18
train_steps = bench_drift.QUICK_TRAIN_STEPS if QUICK else bench_drift.TRAIN_STEPS

images, labels = next(bench_drift.digits_batches(bench_drift.BATCH, seed=1))
drift = {"sweep": [], "options": [], "per_unit": []}
for units in sorted(set(drift_depths) | set(option_depths)):
    out = bench_drift.measure_depth(
        units,
        train_steps,
        images,
        labels,
        options=option_names if units in option_depths else (),
        per_unit=units == per_unit_depth,
    )
    for key in drift:
        if key != "sweep" or units in drift_depths:
            drift[key] += out[key]

# %%
display(Markdown(bench_drift.report(drift, "notebooks/03_memory_and_drift.ipynb", train_steps)))

# %%
png = bench_drift.plot(OUT_DIR / "bench_drift.png", drift["sweep"])
display(Image(filename=str(png)))

# %% [markdown]
# ### Where the error sits inside a stage
#
# The rebuild starts at the stage's output and walks back, so the first reversible unit
# (unit 0) carries the error accumulated over all the others. `RevNet(exact_every=k)` stores the
# exact input of every k-th unit, which bounds the accumulation to k units.

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for state, marker in (("init", "o"), ("trained", "s")):
    rows = [r for r in drift["per_unit"] if r["state"] == state]
    ax.plot(
        [r["unit"] for r in rows],
        [max(r["rec_rel"], 1e-12) for r in rows],
        marker=marker,
        label=f"rebuilt input, relative error ({state})",
    )
    ax.plot(
        [r["unit"] for r in rows],
        [max(r["rev_f64_rel"], 1e-12) for r in rows],
        marker=marker,
        linestyle="--",
        label=f"unit's parameter gradient vs float64 ({state})",
    )
ax.set_yscale("log")
ax.set_xlabel("reversible unit in the stage (0 = first after the entry unit)")
ax.set_ylabel("relative error")
ax.set_title(f"Per unit, {per_unit_depth} units per stage")
ax.set_xticks(sorted({r["unit"] for r in drift["per_unit"]}))
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# During training, `TrainConfig(drift_every=k)` runs the same measurement every k steps
# (`revjax.drift.DriftMonitor`), writes `drift/...` metrics to `metrics.jsonl` and warns when a
# stage's rebuilt activations drift past `drift_threshold`.
