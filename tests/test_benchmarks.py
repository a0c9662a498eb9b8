"""The benchmarks' quick modes (CPU, seconds): each writes its table and plot; the GPU-only
programs refuse the CPU loudly."""

import json

import pytest

from experiments import (
    _batch_device,
    _report,
    bench_arithmetic,
    bench_batch,
    bench_core,
    bench_memory,
    bench_speed,
    bench_transitions,
    gpu_check,
)


def _table_rows(text: str) -> list[list[str]]:
    """Cells of every Markdown table row (header and separator lines excluded)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _check_outputs(out_dir, name, command):
    md, png = out_dir / f"{name}.md", out_dir / f"{name}.png"
    assert md.exists() and png.exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    first = text.splitlines()[0]
    # The header names hardware, date, jax version and the exact command.
    assert "host cores" in first and "jax " in first and command in first
    return text


@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    results = bench_memory.main(["--quick", "--out-dir", str(tmp_path)])
    text = _check_outputs(tmp_path, "bench_memory", "python -m experiments.bench_memory --quick")
    rows = _table_rows(text)
    header = rows[0]
    assert header[0] == "units per stage"
    for label, _, _ in bench_memory.LINES.values():
        assert f"temp KiB: {label}" in header
    assert [r[0] for r in rows[1:4]] == ["2", "3", "**slope, KiB per unit**"]
    assert "device peak" not in text  # CPU: no device statistics
    # Plain autodiff stores a unit's activations: its line grows, the checkpointed one less.
    slopes = bench_memory.slopes(results)
    assert slopes["rev_plain"] > 0 and slopes["res"] > 0
    assert slopes["res_ckpt"] < slopes["res"]


@pytest.mark.slow  # a benchmark script's quick run (experiments/, not the library)
def test_bench_transitions_quick(tmp_path):
    """Stored vs recomputed transitions with rolled scans (memory and flops only: timing is
    skipped to keep the suite fast): recomputing adds flops, saves memory and keeps the
    parameters; the table names the unroll."""
    argv = ["--quick", "--unroll", "1", "--variants", "store", "remat", "--no-time"]
    results = bench_transitions.main([*argv, "--out-dir", str(tmp_path)])
    text = (tmp_path / "bench_transitions.md").read_text()
    assert "unroll=1" in text.splitlines()[0]
    r = results["revnet_tiny"]
    assert r["remat"]["params"] == r["store"]["params"]
    assert r["remat"]["flops"] > r["store"]["flops"]
    assert r["remat"]["temp"] < r["store"]["temp"]


@pytest.mark.slow  # a benchmark script's quick run (experiments/, not the library)
def test_bench_speed_quick(tmp_path):
    rows = bench_speed.main(["--quick", "--out-dir", str(tmp_path)])
    text = _check_outputs(tmp_path, "bench_speed", "python -m experiments.bench_speed --quick")
    table = _table_rows(text)
    assert table[0][:3] == ["model", "twin", "params"]
    assert "reversible / plain" in table[0] and "compile s reversible" in table[0]
    assert len(table) == 1 + len(bench_speed.QUICK_ENTRIES)
    for r in rows:
        for v in bench_speed.VARIANTS:
            assert r[f"time_{v}"] > 0 and r[f"compile_{v}"] > 0
        # Same parameters with and without memory saving.
        assert r["params_reversible"] == r["params_plain"]
    assert "compile time" in text and "target <= 1.30" in text


def test_bench_batch_refuses_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no GPU/TPU visible.*refuses to fall back"):
        bench_batch.main(["--quick", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "bench_batch.md").exists()


@pytest.mark.slow  # a benchmark script's quick run (experiments/, not the library)
def test_bench_batch_quick_on_cpu(tmp_path):
    rows = bench_batch.main(["--quick", "--allow-cpu", "--out-dir", str(tmp_path)])
    text = _check_outputs(tmp_path, "bench_batch", "--quick --allow-cpu")
    table = _table_rows(text)
    assert [r[0] for r in table[1:]] == ["revnet_tiny", "resnet_tiny"]
    for r in rows:  # nothing runs out of memory on the CPU: the cap is reached
        assert r["largest"] == 4 and r["first_failure"] is None
        assert r["tries"] == [(4, True)]
    assert "lower bound" in text


@pytest.mark.parametrize(
    ("threshold", "start", "cap", "expected"),
    [
        (48, 8, 1024, (32, 64, [8, 16, 32, 64])),  # doubles up to the first failure
        (48, 256, 1024, (32, 64, [256, 128, 64, 32])),  # halves down to the first success
        (48, 100, 1024, (32, 64, [64, 32])),  # starts at a power of two
        (10**6, 4, 16, (16, None, [4, 8, 16])),  # the cap: a lower bound
        (0, 4, 16, (None, 1, [4, 2, 1])),  # not even one image fits
    ],
)
def test_largest_power_of_two(threshold, start, cap, expected):
    best, failed, tries = _batch_device.largest_power_of_two(lambda b: b <= threshold, start, cap)
    assert (best, failed, [b for b, _ in tries]) == expected
    assert all(ok == (b <= threshold) for b, ok in tries)


@pytest.mark.slow  # a benchmark script's quick run (experiments/, not the library)
def test_bench_batch_probe_worker_runs_in_a_fresh_process():
    """The path every GPU try takes: a worker process printing one JSON record."""
    overrides = json.dumps({"units_per_stage": [1], "widths": [4, 8]})
    records = _report.run_json_worker(
        _batch_device.WORKER_MODULE,
        ["--probe", "revnet_tiny", "2", "--size", "8", "--overrides", overrides],
        timeout=120,
    )
    assert records[-1]["ok"] is True and records[-1]["batch"] == 2
    assert records[-1]["total"] > 0 and records[-1]["device_peak"] is None


def test_gpu_check_refuses_cpu(tmp_path):
    with pytest.raises(SystemExit, match="gpu_check: no GPU/TPU visible"):
        gpu_check.main(["--out-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def test_report_helpers(tmp_path):
    assert _report.fit_slope([1, 2, 3], [10, 20, 30]) == pytest.approx(10)
    assert _report.fit_slope([4], [7]) == 0.0
    assert _report.byte_unit([10, 2**19]) == ("KiB", 1024)
    assert _report.byte_unit([2**21]) == ("MiB", 2**20)
    table = _report.markdown_table(["a", "b"], [[1, 2]])
    assert table.splitlines() == ["| a | b |", "| --- | ---: |", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="cells"):
        _report.markdown_table(["a", "b"], [[1]])
    assert _report.command_line("experiments.x", ["--quick", "a b"]) == (
        "python -m experiments.x --quick 'a b'"
    )


def test_bench_arithmetic_digits_runs_train_from_the_first_step(tmp_path):
    # A rerun in the same --workdir must train again, not resume the finished run's checkpoint.
    first = bench_arithmetic.run_folder(tmp_path / "w", "fixed")
    (first / "checkpoints").mkdir()
    second = bench_arithmetic.run_folder(tmp_path / "w", "fixed")
    assert first != second and second.parent == first.parent == tmp_path / "w"
    assert second.name.startswith("fixed-") and not any(second.iterdir())


@pytest.mark.slow  # a benchmark script's quick run (experiments/, not the library)
def test_bench_core_quick(tmp_path):
    out = tmp_path / "bench_core.md"
    rows = bench_core.main(["--quick", "--out", str(out)])
    table = out.read_text()
    assert [r["units"] for r in rows] == [2, 4]
    assert table.count("\n| 2 |") == 1 and table.count("\n| 4 |") == 1
    # The compiled figure is deterministic: reversible memory does not grow with depth.
    assert rows[1]["mem_rolled_reversible"] <= 1.1 * rows[0]["mem_rolled_reversible"]
    assert rows[1]["mem_rolled_plain"] > rows[0]["mem_rolled_plain"]
