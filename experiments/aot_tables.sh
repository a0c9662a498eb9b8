#!/usr/bin/env bash
# Regenerates every GPU/TPU table in results/ that is compiled ahead of time on a host without
# the device (experiments/aot.py; nothing runs, so any CPU host will do):
#
#   bash experiments/aot_tables.sh            # all of them (~1-2 h on 2 busy cores; TPU is slow)
#   bash experiments/aot_tables.sh gpu        # only the H100 / H200 / A100 tables
#   bash experiments/aot_tables.sh tpu        # only the TPU v5e tables
#
# Interpreters: $PYTHON runs the benchmarks (default: python); the compiles run in
# $REVJAX_AOT_CUDA_PYTHON / $REVJAX_AOT_TPU_PYTHON, else .venv-aot-cuda / .venv-aot-tpu
# (`make aot-venvs` creates both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
what=${1:-all}

if [[ $what == all || $what == gpu ]]; then
  # Presets on the H100 target: memory lines, FLOPs of the transition setting, compile time.
  "$PY" -m experiments.bench_models --target h100 --flops
  "$PY" -m experiments.bench_speed --target h100 --models revnet38 revnet110 revnet164
  "$PY" -m experiments.bench_memory --target h100 --depths 1 2 4 9 18
  # Largest batch (simulated) on the H100.
  "$PY" -m experiments.bench_batch --target h100
  # The other GPUs: RevNet-164 vs ResNet-164.
  for t in h200 a100-80 a100-40; do
    "$PY" -m experiments.bench_models --target "$t" --presets revnet164
  done
fi
if [[ $what == all || $what == tpu ]]; then
  # TPU v5e (16 GiB): each compile takes minutes, so the presets of the issue only.
  "$PY" -m experiments.bench_batch --target tpu-v5e
  "$PY" -m experiments.bench_models --target tpu-v5e --presets revnet164
fi
