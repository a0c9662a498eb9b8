#!/usr/bin/env bash
# Runs the GPU check (benchmarks 1, 3, 5, the ImageNet input with DALI, fixed-point exactness
# and the language-model GPU recipe on one GPU, about 11 minutes) from any directory.
# Usage: experiments/gpu_check.sh [OUT_DIR] [more gpu_check.py options]
# Exits non-zero when no GPU is visible or a benchmark fails; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-results/gpu_check}"
shift || true
exec "${PYTHON:-python}" -m experiments.gpu_check --out-dir "$out_dir" "$@"
