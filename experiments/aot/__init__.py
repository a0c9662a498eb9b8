"""Compile for a GPU or TPU target on a host without one (deviceless ahead-of-time compilation).

XLA compiles a program for a device it has only a description of: a GPU from a
``GpuTargetConfig`` text proto (``experiments/targets/*.txtpb``, copied from XLA's own GPU specs),
a TPU from a topology that ``libtpu`` knows (`jax.experimental.topologies.get_topology_desc`).
The compiled program's `memory_analysis()` and `cost_analysis()` are those of the target's
program; nothing is allocated and nothing runs.

Each compile runs in a child process, started by `compile_for_target` in an interpreter that has
the target's JAX plugin (``jax[cuda12]`` or ``jax[tpu]``, same version as ``jax``, each in its
own virtual environment because the CUDA one is large (the AOT guide gives the sizes):
``make aot-venv-cuda`` / ``make aot-venv-tpu``). The child sets what must be set before JAX is
imported (for CUDA: ``CUDA_VISIBLE_DEVICES=-1``, so that no GPU is looked for, and
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``, without which the plugin's start-up check
fails on ``cuInit`` and the plugin is never registered), reads compile jobs as JSON on stdin and
prints one JSON record per job. The ``cpu`` target compiles for this host's CPU with the current
interpreter: the tests exercise the whole path with it, without any CUDA or TPU wheel.

What the figures are:

- **Lower bounds.** No autotuning happens without a device, so every cuDNN convolution gets a
  0-byte workspace; the CUDA context, cuDNN/cuBLAS handles and allocator fragmentation are not
  counted either. A real run needs more (``experiments/gpu_check.sh`` measures the difference
  where a GPU is at hand).
- **Rolled scans.** In the child `jax.default_backend()` is still ``"cpu"``, so revjax's CPU
  default (full unroll) would be compiled for the GPU; every job passes ``unroll`` explicitly
  (``1``, what GPUs and TPUs run) unless it says otherwise.
- **FLOPs** from `cost_analysis()` count the body of a rolled loop once, not once per trip:
  compare FLOPs of fully unrolled programs (``unroll=True``) only.
- **cuBLAS GEMMs.** GPU compiles get `GPU_XLA_FLAGS` (Triton GEMM fusions off: see there);
  ``$REVJAX_AOT_XLA_FLAGS`` adds flags after them (the parent's own ``XLA_FLAGS`` are for its
  CPU and never reach the child). Table headers name the flags a compile ran with.

    python -m experiments.aot --list                                 # the known targets
    python -m experiments.aot --target h100 --model revnet164 --batch 128  # ...: fits
    python -m experiments.aot --target cpu --model revnet_tiny --batch 2 --size 8 --memory-gib 1

``--batch N`` ends with a verdict: ``fits`` when the compiled step (state donated, as in the
training loop) is within the target's `Budget`, its memory minus ``--reserve`` (10 %), the same
budget as ``experiments.bench_batch --target``; ``does not fit`` otherwise.

Interpreters: ``--python`` (or the ``aot_python`` argument), else ``$REVJAX_AOT_CUDA_PYTHON`` /
``$REVJAX_AOT_TPU_PYTHON``, else ``.venv-aot-cuda/bin/python`` / ``.venv-aot-tpu/bin/python`` in
the repository root (what ``make aot-venv-cuda`` / ``make aot-venv-tpu`` create).

Modules: `targets` (the devices, table-header descriptions), `budgets` (what a step may take),
`compiler` (a compile job and the child process that compiles it), `child` (the child's side),
`cache` (compile records on disk), `pool` (many compiles over several children), `cli` (the
command and the benchmarks' ``--target`` options).
"""

from experiments.aot.budgets import DEFAULT_RESERVE as DEFAULT_RESERVE
from experiments.aot.budgets import Budget as Budget
from experiments.aot.budgets import budget_for as budget_for
from experiments.aot.cache import CompileCache as CompileCache
from experiments.aot.cache import open_cache as open_cache
from experiments.aot.cache import source_fingerprint as source_fingerprint
from experiments.aot.cli import add_budget_arguments as add_budget_arguments
from experiments.aot.cli import add_target_arguments as add_target_arguments
from experiments.aot.cli import main as main
from experiments.aot.cli import print_verdict as print_verdict
from experiments.aot.compiler import TargetCompiler as TargetCompiler
from experiments.aot.compiler import child_env as child_env
from experiments.aot.compiler import job as job
from experiments.aot.compiler import target_python as target_python
from experiments.aot.pool import compile_for_target as compile_for_target
from experiments.aot.pool import records_by_key as records_by_key
from experiments.aot.pool import require_compiled as require_compiled
from experiments.aot.pool import run_in_threads as run_in_threads
from experiments.aot.pool import share_out as share_out
from experiments.aot.targets import GPU_XLA_FLAGS as GPU_XLA_FLAGS
from experiments.aot.targets import LOWER_BOUND_NOTE as LOWER_BOUND_NOTE
from experiments.aot.targets import ROOT as ROOT
from experiments.aot.targets import TARGETS as TARGETS
from experiments.aot.targets import TARGETS_DIR as TARGETS_DIR
from experiments.aot.targets import XLA_FLAGS_VAR as XLA_FLAGS_VAR
from experiments.aot.targets import GiB as GiB
from experiments.aot.targets import Target as Target
from experiments.aot.targets import describe as describe
from experiments.aot.targets import get_target as get_target
from experiments.aot.targets import lower_bound_note as lower_bound_note

__all__ = [
    "DEFAULT_RESERVE",
    "GPU_XLA_FLAGS",
    "LOWER_BOUND_NOTE",
    "ROOT",
    "TARGETS",
    "TARGETS_DIR",
    "XLA_FLAGS_VAR",
    "Budget",
    "CompileCache",
    "GiB",
    "Target",
    "TargetCompiler",
    "add_budget_arguments",
    "add_target_arguments",
    "budget_for",
    "child_env",
    "compile_for_target",
    "describe",
    "get_target",
    "job",
    "lower_bound_note",
    "main",
    "open_cache",
    "print_verdict",
    "records_by_key",
    "require_compiled",
    "run_in_threads",
    "share_out",
    "source_fingerprint",
    "target_python",
]
