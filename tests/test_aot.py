"""Ahead-of-time compilation for other devices (experiments/aot/), with this host's CPU as the
target: the child-process plumbing the GPU/TPU compiles use, without any CUDA or TPU wheel."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import _batch_target, _report, aot, bench_batch, bench_models, bench_vit

TINY = {"units_per_stage": [1], "widths": [4, 8]}


def test_lower_bound_note_per_platform():
    notes = {aot.lower_bound_note(t) for t in aot.TARGETS.values()}
    assert len(notes) == 3  # cuda, tpu, cpu
    assert "cuDNN" in aot.lower_bound_note(aot.TARGETS["h100"])
    assert "cuDNN" not in aot.lower_bound_note(aot.TARGETS["tpu-v5e"])


def test_targets_name_their_device_memory():
    gpus = [t for t in aot.TARGETS.values() if t.platform == "cuda"]
    tpus = [t for t in aot.TARGETS.values() if t.platform == "tpu"]
    assert {t.name for t in gpus} >= {"h100", "h200", "a100-40", "a100-80"}
    assert {t.name for t in tpus} >= {"tpu-v5e", "tpu-v4", "tpu-v5p"}
    for t in gpus:
        text = (aot.TARGETS_DIR / t.config_file).read_text()
        # The budget is the proto's own figure, and the proto describes the named device.
        assert f"device_memory_size: {t.memory_bytes}" in text
        assert re.search(r'device_description_str: "NVIDIA', text)
    by_name = {t.name: t.memory_bytes / 2**30 for t in (*gpus, *tpus)}
    assert 75 < by_name["h100"] < 80 and 135 < by_name["h200"] < 142
    assert 39 < by_name["a100-40"] < 40 and 79 < by_name["a100-80"] < 80
    assert by_name["tpu-v5e"] == 16 and by_name["tpu-v4"] == 32 and by_name["tpu-v5p"] == 95
    with pytest.raises(SystemExit, match="unknown target 'h1000'.*h100"):
        aot.get_target("h1000")


def test_missing_interpreter_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("REVJAX_AOT_CUDA_PYTHON", raising=False)
    monkeypatch.setattr(aot.compiler, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"make aot-venv-cuda.*REVJAX_AOT_CUDA_PYTHON"):
        aot.target_python(aot.TARGETS["h100"])


def test_child_env_drops_cpu_settings(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv(aot.XLA_FLAGS_VAR, raising=False)
    env = aot.child_env(aot.TARGETS["h100"])
    # The parent's CPU flags never reach a GPU compile; the GPU flags do.
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"
    assert "JAX_PLATFORMS" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(aot.ROOT)
    assert "XLA_FLAGS" not in aot.child_env(aot.TARGETS["tpu-v5e"])
    assert "XLA_FLAGS" not in aot.child_env(aot.TARGETS["cpu"])


def test_child_xla_flags_follow_the_targets_and_reach_the_header(monkeypatch):
    """$REVJAX_AOT_XLA_FLAGS comes after the target's flags (XLA keeps the last of a repeated
    flag, so it can turn Triton GEMMs back on), and a table header names the flags used."""
    monkeypatch.setenv(aot.XLA_FLAGS_VAR, "--xla_gpu_enable_triton_gemm=true")
    gpu = aot.child_env(aot.TARGETS["h100"])["XLA_FLAGS"].split()
    assert gpu == [*aot.GPU_XLA_FLAGS, "--xla_gpu_enable_triton_gemm=true"]
    assert aot.child_env(aot.TARGETS["cpu"])["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
    info = {"device_kind": "NVIDIA H100 80GB HBM3", "versions": {"jax": "x"}, "host": "h"}
    assert "XLA_FLAGS" not in aot.describe(aot.TARGETS["h100"], info)
    flags = " ".join(aot.GPU_XLA_FLAGS)
    header = aot.describe(aot.TARGETS["h100"], {**info, "xla_flags": flags})
    assert f"XLA_FLAGS `{flags}`" in header


def test_job_carries_a_train_config_only_when_given():
    assert "config" not in aot.job("revnet_tiny", TINY, batch=2, size=8)
    recipe = {"optimizer": "adamw", "layer_decay": 0.75, "freeze": ["embed"]}
    assert aot.job("revnet_tiny", TINY, batch=2, size=8, config=recipe)["config"] == recipe


def test_child_compiles_what_this_process_compiles():
    """The child's figures are those of the same step compiled here; a bad job is reported as an
    error record without killing the child, and later jobs still compile; two children share
    the jobs and the records come back in the jobs' order."""
    jobs = [
        aot.job("revnet_tiny", TINY, batch=2, size=8, key="ok"),
        aot.job("no_such_preset", {}, batch=2, size=8, key="bad"),
        aot.job("revnet_tiny", TINY, batch=4, size=8, key="ok4", donate=True),
    ]
    info, records = aot.compile_for_target("cpu", jobs, timeout=300, processes=2)
    assert info["platform"] == "cpu" and info["default_backend"] == "cpu"
    ok, bad, ok4 = records
    assert [r["key"] for r in records] == ["ok", "bad", "ok4"]
    assert "no_such_preset" in bad["error"]
    step, state, batch = _report.abstract_train_step(
        "revnet_tiny", {**TINY, "unroll": 1}, batch_size=2, image_size=8
    )
    here = _report.compiled_step_memory(step, state, batch)
    for field in ("temp", "argument", "output"):
        assert ok[field] == here[field]
    assert ok["params"] == _report.num_params(state)
    assert ok["flops"] > 0 and ok["compile_s"] > 0
    # Donation aliases the state: counted once, as in the training loop.
    assert ok["alias"] == 0 and ok4["alias"] > 0
    assert ok4["total"] == ok4["argument"] + ok4["output"] + ok4["temp"] - ok4["alias"]


def test_step_builds_without_the_experiments_extra():
    """The compile venvs install revjax alone (``pip install -e .``: no Grain, TFDS or
    scikit-learn), so a child must build its config and abstract step without `revjax.data`."""
    code = (
        "import sys\n"
        "for name in ('grain', 'tensorflow_datasets', 'sklearn'):\n"
        "    sys.modules[name] = None  # import raises ImportError, as where it is not installed\n"
        "from experiments import _report\n"
        "_report.abstract_train_step('revnet_tiny', {'unroll': 1}, batch_size=2, image_size=8)\n"
        "print('built', flush=True)\n"
        "import revjax.data\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    # The step built; only the final import of the data package failed, on Grain.
    assert proc.stdout.strip() == "built", proc.stderr
    assert proc.returncode == 1 and "import of grain halted" in proc.stderr, proc.stderr


def test_batch_ends_with_the_fits_verdict(tmp_path, capsys):
    """``aot --batch N`` ends with fits / does not fit against the target's memory minus the
    reserve bench_batch uses; the figures it judges are those of the donated train step."""
    argv = ["--target", "cpu", "--model", "revnet_tiny", "--batch", "2", "--size", "8"]
    argv += ["--overrides", json.dumps(TINY), "--cache", str(tmp_path / "cache.jsonl")]
    aot.main([*argv, "--memory-gib", "1"])
    out = capsys.readouterr().out.splitlines()
    total_mib = float(next(line for line in out if "total:" in line).split()[1])
    assert out[-1].startswith("fits: ")
    assert f"minus a {aot.DEFAULT_RESERVE:.0%} reserve = 0.90 GiB" in out[-1]
    (entry,) = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert entry["record"]["donate"] and entry["record"]["alias"] > 0  # as the training loop
    assert abs(entry["record"]["total"] / 2**20 - total_mib) <= 0.05
    # A budget below the compiled total (the rerun is answered from the cache).
    gib = entry["record"]["total"] / 2**30
    aot.main([*argv, "--memory-gib", str(gib), "--reserve", "0.5"])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("does not fit: ") and "--memory-gib" in last
    aot.main(argv)  # the cpu target has no device memory of its own
    assert capsys.readouterr().out.splitlines()[-1].startswith("no verdict: ")
    budget = aot.budget_for(aot.TARGETS["h100"])
    assert budget.bytes == aot.TARGETS["h100"].memory_bytes * (1 - aot.DEFAULT_RESERVE)
    assert budget.verdict(budget.bytes) == "fits" and budget.verdict(budget.bytes + 1) != "fits"
    # For a TPU also libtpu's peak, the count its out-of-memory check uses; not for a GPU.
    record = {**entry["record"], "peak": 3 * 2**20}
    from experiments.aot import cli

    cli.print_record(record, aot.TARGETS["tpu-v5e"])
    assert "     peak:        3.0 MiB (libtpu's count)" in capsys.readouterr().out
    cli.print_record(record, aot.TARGETS["h100"])
    assert "peak" not in capsys.readouterr().out


def _fake_totals(fixed, per_image, budget, oom_above=None):
    calls = []

    def total_of(b):
        calls.append(b)
        total = fixed + per_image * b
        if oom_above is not None and total > oom_above:
            return math.inf  # a compile that runs out of memory
        return total

    return total_of, calls


@pytest.mark.parametrize(
    ("fixed", "per_image", "budget", "start"),
    [(100.0, 3.0, 10_000.0, 128), (5.0, 1.0, 1000.0, 4096), (0.0, 10.0, 81.0, 8)],
)
def test_largest_fitting_batch_brackets_the_boundary(fixed, per_image, budget, start):
    total_of, calls = _fake_totals(fixed, per_image, budget)
    best, failed, tries = _batch_target.largest_fitting_batch(
        total_of, budget, start=start, multiple=8
    )
    exact = int((budget - fixed) // per_image) // 8 * 8
    assert best == exact and failed == exact + 8
    assert len(tries) <= 4  # affine: predicted, then confirmed on both sides
    assert {b for b, _ in tries} >= {exact, exact + 8}


def test_largest_fitting_batch_bisects_where_memory_is_convex():
    # Memory far from affine (TPU v5e, ResNet-164: 5.55 GiB at 128 images, 14.8 GiB at 264): a
    # line through the nearest points moves one end of the bracket a few images at a time
    # (here 144, 160, 168, ... up to the cap); bisection finds the boundary.
    budget = 14.4
    total_of = lambda b: 0.5 + 1e-6 * b**3  # 2.6 at 128, 14.4 at 240
    best, failed, tries = _batch_target.largest_fitting_batch(
        total_of, budget, start=128, multiple=8, max_compiles=12
    )
    exact = max(b for b in range(8, 400, 8) if total_of(b) <= budget)
    assert best == exact and failed <= exact + 32, tries  # measured: 240 and 272


def test_largest_fitting_batch_edges():
    # Nothing fits, not even the smallest multiple.
    best, failed, _ = _batch_target.largest_fitting_batch(lambda b: 1e9, 10.0, start=64)
    assert best is None and failed == 8
    # The cap: a lower bound, no failure seen.
    best, failed, _ = _batch_target.largest_fitting_batch(lambda b: b, 1e9, start=8, max_batch=64)
    assert best == 64 and failed is None
    # Compiles well above the budget run out of memory (no bytes): still bracketed.
    total_of, _ = _fake_totals(50.0, 1.0, 1000.0, oom_above=1100.0)
    best, failed, _ = _batch_target.largest_fitting_batch(total_of, 1000.0, start=1024)
    assert best == 944 and failed == 952


def _first_line(path):
    return path.read_text().splitlines()[0]


def test_memory_lines_name_the_arithmetic():
    """The default line names the RevNet constructor's arithmetic; with fixed-point carries the
    table also compiles the paper's float carries (with their periodic exact checkpoint)."""
    import inspect

    from revjax.models import RevNet

    default = inspect.signature(RevNet.__init__).parameters["arithmetic"].default
    lines = bench_models.memory_lines()
    assert f"arithmetic={default!r}" in lines["rev"][0]
    if default == "fixed":
        assert lines["rev_float"][2] == {"arithmetic": "float", "exact_every": 8}
    else:
        assert "rev_float" not in lines


def test_bench_models_table_names_the_peak_of_an_unreported_temp():
    """A compile whose temp libtpu reports as 0 although its peak exceeds its arguments and
    outputs gets a note with that peak; a row with temp counted gets none."""
    mib = 2**20

    def record(temp, peak):
        return {"params": 10, "temp": temp * mib, "peak": peak * mib, "argument": 3 * mib,
                "output": 2 * mib, "trace_lower_s": 1.0, "compile_s": 2.0}  # fmt: skip

    results = {
        "revnet38": {
            "twin": "resnet32",
            "batch": 128,
            "lines": {
                "rev": {"memory": record(84, 80)},
                "rev_invertible": {"memory": record(0, 92.5)},
                "res": {"memory": record(300, 290)},
            },
        }
    }
    text = bench_models.to_markdown_target(results, "head", aot.get_target("tpu-v5e"))
    note = text.split("Temp 0.0:")[1]
    assert "downsample='invertible': 92.5 MiB peak, 5.0 MiB arguments + outputs" in note
    assert "defaults" not in note and "ResNet twin" not in note
    # On a TPU the peak decides what fits: its own columns, its ratio to the twin's peak.
    header, _, default = text.splitlines()[2:5]
    assert "| peak MiB | peak / ResNet twin |" in header
    assert "| 84.0 | 0.280 | 80.0 | 0.276 |" in default
    results["revnet38"]["lines"]["rev_invertible"]["memory"] = record(70, 92.5)
    text = bench_models.to_markdown_target(results, "head", aot.get_target("tpu-v5e"))
    assert "Temp 0.0:" not in text
    text = bench_models.to_markdown_target(results, "head", aot.get_target("h100"))
    assert "peak" not in text.splitlines()[2]  # GPU backends report no peak


@pytest.mark.slow
def test_benchmarks_compile_for_a_target(tmp_path, capsys):
    """bench_models and bench_batch with ``--target cpu``: compiled in the child, the tables
    headed by the target (bench_memory / bench_speed share the same `aot.compile_for_target`)."""
    out = str(tmp_path)
    results = bench_models.main(
        ["--quick", "--target", "cpu", "--flops", "--lines", "rev", "rev_plain", "res"]
        + ["--out", out]
    )
    text = (tmp_path / "bench_models_cpu.md").read_text()
    assert "target **cpu**" in _first_line(tmp_path / "bench_models_cpu.md")
    assert "lower bound" in text and "extra" in text
    assert "cuDNN" not in text  # the note fits the target's kind of device
    lines = results["revnet_tiny"]["lines"]
    assert "memory" not in lines.get("res_ckpt", {})  # --lines
    assert lines["rev"]["memory"]["temp"] < lines["rev_plain"]["memory"]["temp"]
    # The defaults once more with the state donated, as `aot --batch N` compiles them.
    assert lines["rev"]["donated"]["alias"] > 0 and lines["rev"]["memory"]["alias"] == 0
    assert "state donated" in text and "revnet_tiny " in text.split("state donated")[-1]
    remat_on, remat_off = lines["rev"]["flops"], lines["rev_transitions"]["flops"]
    if not bench_models.REMAT_DEFAULT:
        remat_on, remat_off = remat_off, remat_on
    assert remat_on["lowered_flops"] > remat_off["lowered_flops"]  # the recomputation

    with pytest.raises(SystemExit, match="no device memory"):
        bench_batch.main(["--target", "cpu", "--models", "revnet_tiny", "--out-dir", out])
    argv = ["--target", "cpu", "--models", "revnet_tiny", "--size", "8", "--memory-gib", "0.002"]
    argv += ["--reserve", "0", "--out-dir", out, "--cache", str(tmp_path / "cache.jsonl")]
    (row,) = bench_batch.main(argv)
    budget = 0.002 * 2**30
    assert row["records"][row["largest"]]["total"] <= budget
    assert row["records"][row["first_failure"]]["total"] > budget
    assert row["first_failure"] == row["largest"] + 8
    assert not any(r.get("cached") for r in row["records"].values())
    # A rerun answers every compile from the cache, with the same search and figures; a torn
    # last line (a run killed mid-write) is skipped.
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "torn')
    capsys.readouterr()
    (again,) = bench_batch.main(argv)
    assert all(r["cached"] for r in again["records"].values())
    progress = [line for line in capsys.readouterr().out.splitlines() if ": batch " in line]
    assert progress and all("from the cache" in line for line in progress)
    assert again["tries"] == row["tries"]
    # Another batch, or other versions, is not a hit.
    cache = aot.CompileCache(tmp_path / "cache.jsonl")
    cpu, info = aot.TARGETS["cpu"], {"versions": {"jax": "0.10.2"}}
    spec = aot.job("revnet_tiny", {"unroll": 1}, batch=8, size=8)
    key = cache.key(cpu, info, spec)
    assert key != cache.key(cpu, info, {**spec, "batch": 16})
    assert key != cache.key(cpu, {"versions": {"jax": "0.10.3"}}, spec)
    assert "target **cpu**" in _first_line(tmp_path / "bench_batch_cpu.md")


def test_start_per_model():
    """``--start 128 revnet164:downsample=invertible=4600``: a global start and one per model."""
    starts = [bench_batch.parse_start(s) for s in ("128", "revnet164:downsample=invertible=4600")]
    assert bench_batch.start_for(starts, "revnet164:downsample=invertible") == 4600
    assert bench_batch.start_for(starts, "resnet164") == 128
    assert bench_batch.start_for(None, "resnet164") is None
    with pytest.raises(argparse.ArgumentTypeError, match="MODEL=N"):
        bench_batch.parse_start("revnet164=many")


def test_line_near_budget_only_where_memory_rises():
    """The bytes-per-image line runs through the two compiles nearest the budget; a flat or
    falling pair (TPU memory is not monotone in the batch) predicts nothing."""
    gib = 2**30
    tries = [(128, 1 * gib), (1024, 8 * gib), (1280, 10 * gib), (4096, math.inf)]
    per_image, predicted = _batch_target.line_near_budget(tries, 14 * gib, 8)
    assert per_image == pytest.approx(2 * gib / 256)
    assert predicted == 1792
    # ResNet-110 on the TPU v5e target: 904, 912 and 952 images all compile to 15.08 GiB
    flat = [(744, 11.2 * gib), (952, 15.08 * gib), (912, 15.08 * gib), (880, 13.2 * gib)]
    assert _batch_target.line_near_budget(flat, 14.4 * gib, 8) == (None, None)
    unbounded = [(128, gib), (256, math.inf)]
    assert _batch_target.line_near_budget(unbounded, 14 * gib, 8) == (None, None)


@pytest.mark.slow
def test_bench_vit_compiles_for_a_target(tmp_path):
    """bench_vit --target: the RevViT / ViT memory table compiled in the child (no step
    times), equal to what this process compiles, headed by the target."""
    results = bench_vit.main(["--quick", "--target", "cpu", "--out", str(tmp_path)])
    first = _first_line(tmp_path / "bench_vit_cpu.md")
    assert "target **cpu**" in first and "no step times" in first
    assert (tmp_path / "bench_vit_cpu.png").exists() and not results["time"]
    step, state, batch = _report.abstract_train_step(
        "vit_tiny", {"depth": 4, "unroll": 1}, batch_size=2, image_size=8
    )
    assert results["temp"]["vit"][4] == _report.compiled_step_memory(step, state, batch)["temp"]
    assert results["temp"]["vit"][4] > results["temp"]["vit"][2]  # the twin grows with depth


@pytest.mark.slow  # a benchmark script's quick run (experiments/, not the library)
def test_bench_finetune_compiles_for_a_target(tmp_path):
    """bench_finetune --target: the fine-tuning recipe (AdamW, layer decay, frozen embedding)
    reaches the child, whose figures are those of the same donated step compiled here."""
    import jax

    from experiments import bench_finetune

    out = bench_finetune.main(["--quick", "--target", "cpu", "--out-dir", str(tmp_path)])
    first = _first_line(tmp_path / "bench_finetune_cpu.md")
    assert "target **cpu**" in first and "layer decay 0.75" in first
    assert out["transfer"] is None and not (tmp_path / "bench_finetune.md").exists()
    (row,) = out["memory"].values()
    assert row["rev"]["config"]["optimizer"] == "adamw"
    overrides = {"image_size": 32, "unroll": 1, **bench_finetune.QUICK_MODEL}
    step, state, batch = _report.abstract_train_step(
        "revvit_s16", overrides, batch_size=2, image_size=32, num_classes=10, donate=True,
        config=bench_finetune.RECIPE,
    )
    here = _report.compiled_step_memory(step, state, batch)
    for field in ("temp", "argument", "output", "alias"):
        assert row["rev"][field] == here[field]
    # AdamW's two moments: more state than the default optimizer's
    default = _report.abstract_train_step(
        "revvit_s16", overrides, batch_size=2, image_size=32, num_classes=10
    )[1]
    assert _report.num_params(state) == _report.num_params(default)

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    assert nbytes(state) > nbytes(default)
