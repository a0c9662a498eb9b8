#!/usr/bin/env bash
# Regenerates the GPU/TPU tables in results/ that are compiled ahead of time on a host without the
# device (experiments/aot.py; nothing runs, so any CPU host will do):
#
#   bash experiments/aot_tables.sh            # all of them
#   bash experiments/aot_tables.sh gpu        # the H100 (and other GPU) tables only
#   bash experiments/aot_tables.sh tpu        # the TPU v5e tables only
#
# Time: an H100 compile of a CIFAR preset takes ~15 s of one core, a TPU v5e compile ~4 min;
# on 2 idle cores the GPU half takes ~40 min, the TPU half ~1 h. $PROCESSES child processes
# compile at once (default 2). On a busy host everything stretches accordingly.
#
# Interpreters: $PYTHON runs the benchmarks (default: python); the compiles run in
# $REVJAX_AOT_CUDA_PYTHON / $REVJAX_AOT_TPU_PYTHON, else .venv-aot-cuda / .venv-aot-tpu
# (`make aot-venvs` creates both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
N=${PROCESSES:-2}
what=${1:-all}

if [[ $what == all || $what == gpu ]]; then
  # Presets on the H100: every memory line, compile times, FLOPs of the transition setting.
  "$PY" -m experiments.bench_models --target h100 --flops --presets revnet164 revnet110 revnet38 \
    --lines rev rev_transitions rev_invertible rev_invertible_flat res --processes "$N"
  # Largest batch (simulated) on the H100.
  "$PY" -m experiments.bench_batch --target h100 --processes "$N" --max-compiles 5 \
    --models revnet164 resnet164 revnet104 resnet101 revnet110 resnet110 revnet38 resnet32 \
    revnet164:downsample=invertible,exact_every=None
  # Memory and compile time vs depth (one stage of basic units), H100.
  "$PY" -m experiments.bench_memory --target h100 --depths 1 2 4 9 18 --processes "$N"
  "$PY" -m experiments.bench_speed --target h100 --models revnet38 revnet110 revnet164 --repeats 3
  # The other GPU targets: the presets' default line against the ResNet twins.
  for t in h200 a100-80 a100-40; do
    "$PY" -m experiments.bench_models --target "$t" --presets revnet164 revnet110 revnet38 \
      --lines rev rev_invertible_flat res --processes "$N"
  done
fi
if [[ $what == all || $what == tpu ]]; then
  # TPU v5e (16 GiB): each compile takes minutes, so the RevNet-164 pair only. TPU memory is
  # far from affine in the batch (RevNet-164: 2.0 MiB per image at 128, 2.3 at 7,296), so the
  # search needs up to five compiles to close the bracket.
  "$PY" -m experiments.bench_batch --target tpu-v5e --processes "$N" --max-compiles 5 \
    --models revnet164 resnet164
  "$PY" -m experiments.bench_models --target tpu-v5e --presets revnet164 \
    --lines rev rev_invertible_flat res --processes "$N"
fi
