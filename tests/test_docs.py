"""The documentation: API reference complete, internal links resolve, examples run.

Static checks that do not run Sphinx (the docs build itself, `make docs`, fails on any broken
reference): every public name has an API entry, every link and include between pages points at
a file that exists, every results file is shown on a results page, and every Python example of
the pages and of the README runs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import pytest

import revjax
import revjax.data
import revjax.finetune
import revjax.presets
import revjax.pretrained
import revjax.reference
import revjax.train

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(
    p for p in DOCS.rglob("*.md") if "_build" not in p.parts and "_generated" not in p.parts
)
# Example pages: every ```python block runs, in order, in one namespace per page.
EXAMPLE_PAGES = [p for p in PAGES + [ROOT / "README.md"] if "```python\n" in p.read_text()]

sys.path.insert(0, str(DOCS / "_ext"))
import revjax_docs  # noqa: E402

_AUTOSUMMARY = re.compile(r"^\.\. autosummary::\n(?:   :[^\n]*\n)*\n((?:   \S+\n)+)", re.M)


def _api_names(page: str) -> list[str]:
    text = (DOCS / "api" / page).read_text()
    return [name.strip() for block in _AUTOSUMMARY.findall(text) for name in block.split()]


@pytest.mark.parametrize(
    "page, module",
    [
        ("revjax.md", revjax),
        ("presets.md", revjax.presets),
        ("pretrained.md", revjax.pretrained),
        ("finetune.md", revjax.finetune),
        ("reference.md", revjax.reference),
        ("data.md", revjax.data),
        ("train.md", revjax.train),
    ],
    ids=lambda v: v.__name__ if hasattr(v, "__name__") else None,
)
def test_api_reference_lists_every_public_name(page, module):
    listed = _api_names(page)
    assert len(listed) == len(set(listed)), f"docs/api/{page} lists a name twice"
    missing = sorted(set(module.__all__) - set(listed))
    extra = sorted(set(listed) - set(module.__all__))
    assert not missing, f"public names of {module.__name__} missing from docs/api/{page}: {missing}"
    assert not extra, f"docs/api/{page} lists names not in {module.__name__}.__all__: {extra}"


def _targets(page: Path) -> list[tuple[str, Path]]:
    """(what, path) of every internal reference on a page: {doc}, links, includes, toctrees."""
    text = page.read_text()
    out = []
    for target in re.findall(r"\{doc\}`(?:[^`<]*<)?([^`>]+)>?`", text):
        base = DOCS if target.startswith("/") else page.parent
        out.append((f"{{doc}}`{target}`", base / f"{target.lstrip('/')}"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        out.append((f"link {target}", page.parent / target.split("#")[0]))
    for target in re.findall(r"^```\{include\} (\S+)", text, re.M):
        out.append((f"include {target}", page.parent / target))
    for block in re.findall(r"^```\{toctree\}\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            if line.strip() and not line.startswith(":"):
                out.append((f"toctree {line.strip()}", page.parent / line.strip()))
    return out


def _exists(path: Path) -> bool:
    generated = DOCS / "_generated" / "results"
    if path.parent == generated.resolve() or path.parent.resolve() == generated.resolve():
        return (ROOT / "results" / path.name).exists()  # written at build time from results/
    if path.resolve() in {(DOCS / "_generated" / name).resolve()
                          for name in ("train_config_fields.md", "paper_configs.md")}:
        return True  # written at build time
    if path.parent.resolve() == (DOCS / "notebooks").resolve() and not path.suffix:
        notebook = ROOT / "notebooks" / f"{path.name}.ipynb"
        return notebook.exists() or path.with_suffix(".md").exists()
    return path.exists() or path.with_suffix(".md").exists() or path.with_suffix(".ipynb").exists()


@pytest.mark.parametrize(
    "page", PAGES + [ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_internal_links_resolve(page):
    broken = [what for what, path in _targets(page) if not _exists(path)]
    assert not broken, f"{page.relative_to(ROOT)}: unresolved {broken}"


def test_every_page_is_in_a_toctree():
    listed = set()
    for page in PAGES:
        for what, path in _targets(page):
            if what.startswith("toctree"):
                listed.add(path.resolve().with_suffix(""))
    orphans = [
        str(p.relative_to(DOCS))
        for p in PAGES
        if p != DOCS / "index.md" and p.resolve().with_suffix("") not in listed
    ]
    assert not orphans, f"pages in no toctree: {orphans}"


def test_every_results_file_is_on_a_results_page():
    claimed = {stem for stems in revjax_docs.RESULT_PAGES.values() for stem in stems}
    present = {p.stem for p in (ROOT / "results").glob("*.md")}
    assert claimed == present, (
        f"not on a page: {sorted(present - claimed)}; no such file: {sorted(claimed - present)}"
    )
    for page, stems in revjax_docs.RESULT_PAGES.items():
        text = (DOCS / "results" / f"{page}.md").read_text()
        for stem in stems:
            assert f"_generated/results/{stem}.md" in text, f"docs/results/{page}.md omits {stem}"


def test_results_header_parsed():
    head = revjax_docs.split_header(
        "Title (2026-01-02, cpu (cpu), 2 host cores): what it is; `python -m experiments.x --a 1`"
    )
    assert head == {
        "title": "Title",
        "date": "2026-01-02",
        "setting": "cpu (cpu), 2 host cores",
        "description": "what it is",
        "command": "python -m experiments.x --a 1",
    }
    for path in sorted((ROOT / "results").glob("*.md")):
        head = revjax_docs.split_header(path.read_text().splitlines()[0])
        made_by = ("python -m experiments.", "python -m pytest")  # a benchmark, or the suite
        assert head["date"] and head["command"].startswith(made_by), path.name


def test_train_config_table_has_every_field():
    import dataclasses

    table = revjax_docs.config_table()  # raises when a field has no docstring entry
    for field in dataclasses.fields(revjax.train.TrainConfig):
        assert f"| `{field.name}` |" in table


def test_version_license_changelog():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"$', pyproject, re.M)[1] == revjax.__version__
    assert re.search(r'^license-files = \[.*"LICENSE".*\]$', pyproject, re.M)
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = revjax.__version__
    assert f"({version})" in changelog or f"## [{version}]" in changelog


def _python_blocks(page: Path) -> str:
    return "\n".join(re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S))


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, capsys):
    code = compile(_python_blocks(page), str(page), "exec")
    # As users run them: JAX's default promotion rules, not the suite's strict ones.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(code, {"__name__": f"docs_example_{page.stem}"})


def test_readme_figures_are_in_the_results_files_they_cite():
    rows = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("|") and "](results/" in line
    ]
    assert len(rows) >= 5
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        source = re.search(r"\]\((results/[^)]+)\)", cells[-1])[1]
        text = (ROOT / source).read_text()
        for cell in cells[1:-1]:
            for figure in re.findall(r"\d[\d,]*\.?\d*", cell):
                assert figure in text, f"README figure {figure} is not in {source}: {row}"
