"""Executes the notebooks in place, storing their outputs (what Colab opens and the docs render).

    python notebooks/execute.py                    # every notebook, quick mode
    python notebooks/execute.py 01_quickstart      # one

Run it from a checkout with revjax installed, after syncing each pair
(``jupytext --update --to ipynb notebooks/<name>.py``). Each notebook runs top to bottom in a
fresh kernel on this interpreter, on the CPU, in quick mode (``REVJAX_QUICK=1``), in a temporary
working directory, with the default XLA flags (printed timings are what a user would see). Only
what a re-run would change for no reason is left out: no execution timestamps, no interpreter
version; the notebook metadata stays as jupytext wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO_ROOT = NOTEBOOK_DIR.parent
KERNEL_NAME = "revjax-execute-python3"
CELL_TIMEOUT_S = 1800


def write_kernelspec(root: Path, name: str, display_name: str) -> Path:
    """``root`` as a Jupyter data dir with a kernelspec ``name`` for this interpreter (a
    `python3` spec elsewhere on the Jupyter path may start another Python). The test suite
    uses it too."""
    spec = root / "kernels" / name
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": display_name,
                "language": "python",
            }
        )
    )
    return root


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(
        REVJAX_QUICK="1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    return env


def _apply_carriage_returns(text: str) -> str:
    """What a terminal shows: each ``\r`` (a progress bar redrawing its line) overwrites the
    line so far."""
    lines = []
    for line in text.split("\n"):
        shown = [part for part in line.split("\r") if part]
        lines.append(shown[-1] if shown else "")
    return "\n".join(lines)


def coalesce_streams(nb) -> None:
    """Joins consecutive stdout (stderr) outputs of a cell and keeps only the last state of a
    progress bar: how printed output is split into messages, and how often a bar redraws,
    depend on timing, so a re-run would otherwise change the file for nothing."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            last = merged[-1] if merged else None
            if (
                out.output_type == "stream"
                and last is not None
                and last.output_type == "stream"
                and last.name == out.name
            ):
                last.text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = _apply_carriage_returns(out.text)
        cell.outputs = merged


def execute(name: str) -> float:
    """Runs ``notebooks/<name>.ipynb`` and writes it back with its outputs; returns seconds."""
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    metadata = json.loads(json.dumps(nb.metadata))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    with tempfile.TemporaryDirectory(prefix=f"revjax_{name}_") as tmp:
        tmp = Path(tmp)
        os.environ["JUPYTER_PATH"] = str(
            write_kernelspec(tmp / "jupyter", KERNEL_NAME, "revjax notebooks")
        )
        workdir = tmp / "work"
        workdir.mkdir()
        client = nbclient.NotebookClient(
            nb,
            kernel_name=KERNEL_NAME,
            timeout=CELL_TIMEOUT_S,
            allow_errors=False,
            record_timing=False,
            resources={"metadata": {"path": str(workdir)}},
        )
        start = time.perf_counter()
        client.execute(env=_kernel_env())
        seconds = time.perf_counter() - start
    nb.metadata = nbformat.from_dict(metadata)  # drops language_info (the Python version)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    coalesce_streams(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: every notebook)")
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    for name in names:
        print(f"{name}: executed in {execute(name):.0f} s", flush=True)


if __name__ == "__main__":
    main()
