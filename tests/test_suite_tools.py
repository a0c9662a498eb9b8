"""The suite's own tools: ``--cpu-times`` (conftest) and its summary, tests/cpu_times.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cpu_times

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_times_records_each_test_and_sums_them(tmp_path):
    out = tmp_path / "cpu.jsonl"
    selected = ["tests/test_structure.py::test_the_cycle_finder_finds_one",
                "tests/test_structure.py::test_no_import_circle_inside_revjax"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
         "--cpu-times", str(out), *selected],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = cpu_times.load(out)
    assert [r["test"] for r in records] == selected
    for r in records:
        assert r["slow"] is False and r["wall"] > 0 and r["cpu"] >= 0 and r["children_cpu"] >= 0
        assert r["total"] == r["cpu"] + r["children_cpu"]
    # A slow child-heavy record beside them: the summary's split, files and ranking.
    records.append({"test": "tests/test_other.py::test_x", "slow": True, "wall": 900.0,
                    "cpu": 100.0, "children_cpu": 400.0, "total": 500.0})
    text = cpu_times.summary(records, top=1)
    own = sum(r["total"] for r in records[:2])
    assert text.splitlines()[0] == (
        f"3 tests, {own + 500:,.0f} CPU-s: marked slow 500, the rest {own:,.0f}; in child "
        f"processes {400 + sum(r['children_cpu'] for r in records[:2]):,.0f}")
    assert "tests/test_structure.py" in text and "tests/test_other.py" in text
    assert text.splitlines()[-1].endswith("tests/test_other.py::test_x [slow]")
