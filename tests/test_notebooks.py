"""The Colab notebooks: each `.ipynb` matches its jupytext `.py` twin and runs top to bottom.

Every notebook executes in quick mode (``REVJAX_QUICK=1``: tiny models, mock or offline data,
no network) in a fresh Jupyter kernel on this interpreter, in a temporary working directory,
and fails on the first cell that raises.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from helpers import one_device_env

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
EXECUTE_SCRIPT = NOTEBOOK_DIR / "execute.py"
NOTEBOOKS = [
    "01_quickstart",
    "02_train_cifar10",
    "03_memory_and_drift",
    "04_your_own_reversible_model",
    "05_finetune_pretrained",
    "06_language_models",
]
REPO_URL = "https://github.com/revjax/revjax"
KERNEL_NAME = "revjax-test-python3"
CELL_TIMEOUT_S = 300

def _sources(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_pair_in_sync(name):
    """The `.ipynb` and the jupytext `.py` have the same cells: regenerate with
    ``jupytext --to ipynb notebooks/<name>.py`` (or ``jupytext --sync``) after editing."""
    py = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    ipynb = jupytext.read(NOTEBOOK_DIR / f"{name}.ipynb")
    assert _sources(py) == _sources(ipynb), (
        f"notebooks/{name}.ipynb is out of sync with notebooks/{name}.py; run "
        f"`jupytext --to ipynb notebooks/{name}.py`."
    )
    assert ipynb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_stores_its_outputs(name):
    """The committed `.ipynb` holds the outputs of one clean top-to-bottom run (what Colab opens
    and the docs render, without executing): regenerate with ``python notebooks/execute.py``."""
    stored = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    rerun = f"run `python notebooks/execute.py {name}`"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"notebooks/{name}.ipynb was not executed top to bottom in one run "
        f"(execution counts {counts}); {rerun}."
    )
    outputs = [out for cell in code for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    pngs = [out.data["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    assert pngs, f"notebooks/{name}.ipynb stores no plot; {rerun}."
    # Base64 PNGs of a figure at matplotlib's default 100 dpi stay well below this.
    assert max(len(png) for png in pngs) < 200_000, f"notebooks/{name}.ipynb: a plot is too large"
    # Nothing that changes on every re-run for no reason.
    assert "language_info" not in stored.metadata, f"{rerun} (it drops the Python version)."
    assert not any("execution" in cell.metadata for cell in stored.cells), (
        f"notebooks/{name}.ipynb stores execution timestamps; {rerun}."
    )
    for cell in code:
        streams = [out.get("name") if out.output_type == "stream" else None for out in cell.outputs]
        assert all(a is None or a != b for a, b in zip(streams, streams[1:])), (
            f"notebooks/{name}.ipynb splits a cell's printed output; {rerun}."
        )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_first_cell_installs_from_repo(name):
    """The first code cell names the repository once and installs only inside Colab."""
    nb = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    first = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert f'REPO_URL = "{REPO_URL}"' in first
    assert first.count(REPO_URL) == 1
    assert '"google.colab" in sys.modules' in first and "if IN_COLAB:" in first
    assert 'os.environ.get("REVJAX_QUICK") == "1"' in first


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Path:
    """A Jupyter data dir with a kernelspec for this interpreter (a `python3` spec elsewhere on
    the Jupyter path may start another Python)."""
    return _execute_module().write_kernelspec(
        tmp_path_factory.mktemp("jupyter"), KERNEL_NAME, "revjax test kernel"
    )


def _execute_module():
    """``notebooks/execute.py`` (not a package), which stores the notebooks' outputs."""
    spec = importlib.util.spec_from_file_location("revjax_notebooks_execute", EXECUTE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_env() -> dict[str, str]:
    # One CPU device as a user has (the suite's conftest asks for 8), the suite's compile
    # settings and cache; the checkout on the path (the notebooks import `experiments`).
    env = one_device_env()
    env.update(
        REVJAX_QUICK="1",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_quick_mode(name, jupyter_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))  # where the kernelspec is found
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    env = _kernel_env()
    # Quick mode must not depend on a dataset prepared on this machine.
    env["TFDS_DATA_DIR"] = str(tmp_path / "tensorflow_datasets")
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # drop the traceback's colours
        pytest.fail(f"notebooks/{name}.ipynb failed in quick mode:\n{text}", pytrace=False)
    # (a cell that raised stopped the run above) Every code cell ran, in order.
    counts = [cell.get("execution_count") for cell in nb.cells
              if cell.cell_type == "code" and cell.source.strip()]
    assert counts == list(range(1, len(counts) + 1)), counts
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"notebooks/{name}.ipynb showed no plot"
