#!/usr/bin/env bash
# Regenerates the GPU/TPU tables in results/ that are compiled ahead of time on a host without the
# device (experiments/aot/; nothing runs, so any CPU host will do):
#
#   bash experiments/aot_tables.sh            # all of them
#   bash experiments/aot_tables.sh gpu        # the H100 (and other GPU) tables only
#   bash experiments/aot_tables.sh tpu        # the TPU v5e tables only (hours)
#   bash experiments/aot_tables.sh tpu-batch  # TPU v5e largest batch of the four pairs only
#
# Time: an H100 compile of a CIFAR preset takes ~15 s of one core, a TPU v5e compile ~4 min;
# on 2 idle cores the GPU half takes ~40 min, the TPU half ~2 h. $PROCESSES child processes
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
case $what in
  all | gpu | tpu | tpu-batch) ;;
  *) echo "usage: bash experiments/aot_tables.sh [all|gpu|tpu|tpu-batch] (got '$what')" >&2; exit 2 ;;
esac
# Compile records are kept here (experiments/aot/, CompileCache): a rerun or an interrupted
# search does not compile again what it compiled for the same sources and versions.
CACHE=${CACHE_DIR:-results/.aot-cache}

if [[ $what == all || $what == gpu ]]; then
  # Presets on the H100: every memory line, compile times, FLOPs of the transition setting.
  "$PY" -m experiments.bench_models --target h100 --flops --presets revnet164 revnet110 revnet38 \
    --lines rev rev_transitions rev_invertible rev_float res --processes "$N" \
    --cache "$CACHE/h100.jsonl"
  # Largest batch (simulated) on the H100, each model starting at the largest batch an earlier
  # run found to fit (RevNet-104: a hand compile), so that a few compiles close every bracket.
  "$PY" -m experiments.bench_batch --target h100 --processes "$N" --max-compiles 8 \
    --cache "$CACHE/h100.jsonl" --start revnet164=34616 resnet164=1952 revnet104=2200 \
    resnet101=472 revnet110=101960 resnet110=5832 revnet38=101976 resnet32=22472 \
    revnet164:downsample=invertible,exact_every=None=41360 \
    --models revnet164 resnet164 revnet104 resnet101 revnet110 resnet110 revnet38 resnet32 \
    revnet164:downsample=invertible,exact_every=None
  # Memory and compile time vs depth (one stage of basic units), H100.
  "$PY" -m experiments.bench_memory --target h100 --depths 1 2 4 9 18 --processes "$N" \
    --cache "$CACHE/h100.jsonl"
  "$PY" -m experiments.bench_speed --target h100 --models revnet38 revnet110 revnet164 --repeats 3
  # RevViT vs ViT against depth on the H100.
  "$PY" -m experiments.bench_vit --target h100 --processes "$N" --cache "$CACHE/h100.jsonl"
  # Fine-tuning ViT-S/16 and ViT-B/16 against their RevViT conversions, 224x224 and 384x384.
  "$PY" -m experiments.bench_finetune --target h100 --cache "$CACHE/h100.jsonl"
  # The other GPU targets: the presets' default line against the ResNet twins.
  for t in h200 a100-80 a100-40; do
    "$PY" -m experiments.bench_models --target "$t" --presets revnet164 revnet110 revnet38 \
      --lines rev rev_invertible_flat res --processes "$N" --cache "$CACHE/$t.jsonl"
  done
fi
if [[ $what == all || $what == tpu || $what == tpu-batch ]]; then
  # Largest batch of every pair on the v5e. TPU memory is far from affine in the batch and not
  # even monotone, so each search starts near its answer: the RevNet-164 pair at the bracket
  # found on 2026-11-29 (fits 5,112 / 256), the others at their H100 brackets scaled by
  # RevNet-164's TPU / H100 ratio (~0.14). TPU compiles take 1-7 minutes each on 2 idle cores
  # (up to 19 under load): 45 compiles, some 1.5 hours with two processes; rerun with the same
  # cache to resume.
  "$PY" -m experiments.bench_batch --target tpu-v5e --processes "$N" --max-compiles 8 \
    --cache "$CACHE/tpu-v5e.jsonl" --start revnet164=5112 resnet164=256 revnet104=240 \
    resnet101=56 revnet110=14000 resnet110=744 revnet38=14000 resnet32=2900 \
    --models revnet164 resnet164 revnet104 resnet101 revnet110 resnet110 revnet38 resnet32
fi
if [[ $what == all || $what == tpu ]]; then
  # The RevNet-164 presets at batch 128 on the v5e (each compile takes minutes).
  "$PY" -m experiments.bench_models --target tpu-v5e --presets revnet164 \
    --lines rev rev_invertible rev_float res --processes "$N" --cache "$CACHE/tpu-v5e.jsonl"
fi
