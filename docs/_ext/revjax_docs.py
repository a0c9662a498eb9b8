"""Pages generated at build time from the sources, so the site cannot drift from them.

- Results: each ``results/*.md`` becomes a fragment (its title, the date and machine it records,
  its command, its plot when ``results/<same name>.png`` exists, then its tables), included by the
  pages under ``docs/results/``. ``RESULT_PAGES`` maps every results file to one page; a results
  file that no page claims fails the build.
- Configuration: the table of every `revjax.train.TrainConfig` field (type, default, meaning),
  read from the dataclass and its docstring's ``Attributes:`` section.
- Paper configs: the table of the paper's rows (`experiments.configs.paper`: config name, model,
  dataset, target accuracy and its source, expected GPU time).
- Notebooks: the ``notebooks/*.ipynb`` are copied into ``docs/notebooks/`` (rendered with the
  outputs they store; the docs build never executes them).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
RESULTS = ROOT / "results"
GENERATED = DOCS / "_generated"

# Results page -> the results files it shows, in order.
RESULT_PAGES: dict[str, tuple[str, ...]] = {
    "memory": ("bench_memory", "bench_models", "bench_transitions", "bench_core", "bench_sharding"),
    "gpu_tpu": (
        "bench_models_h100",
        "bench_memory_h100",
        "bench_batch_h100",
        "bench_speed_h100",
        "bench_models_h200",
        "bench_models_a100-80",
        "bench_models_a100-40",
        "aot_tpu_peak_revnet164",
        "bench_models_tpu-v5e",
        "bench_batch_tpu-v5e",
        "aot_mesh_vit_l16_tpu-v5e-2x4",
        "aot_mesh_vit_l16_h100x8",
        "aot_mesh_vit_l16_tpu-v5p-8",
        "aot_mesh_gpt_1b_tpu-v5e-2x4",
        "aot_mesh_gpt_1b_h100x8",
        "aot_mesh_gpt_1b_largest_tpu-v5e-2x4",
    ),
    "vit": ("bench_vit", "bench_vit_h100", "bench_vit_h100_batch128"),
    "language_models": (
        "bench_lm_accuracy",
        "bench_lm_accuracy_nobias",
        "bench_lm_finetune",
        "bench_lm_memory_w768_grad_h100",
        "bench_lm_memory_w768_b8_grad_h100",
        "bench_lm_memory_w2048_grad_h100",
        "aot_mesh_gpt2_small_largest_h100x1",
        "bench_lm_exact",
        "bench_lm_speed",
    ),
    "finetune": ("bench_finetune", "bench_finetune_h100", "bench_finetune_tpu-v5e",
                 "train_digits_revvit_finetune"),
    "drift": (
        "bench_arithmetic", "exact_hlo_cpu", "exact_hlo_h100", "exact_hlo_tpu-v5e", "bench_drift"
    ),
    "speed_input": ("bench_speed", "bench_memcnn", "bench_input", "bench_soak", "test_suite"),
}

_HEADER = re.compile(r"^(?P<title>[^(]+?) \((?P<meta>.*?)\): (?P<rest>.*)$")
_COMMAND = re.compile(r"`([^`]*python -m [^`]*)`")
_DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")


def split_header(line: str) -> dict[str, str]:
    """Splits a results file's first line into title, date, setting, description and command.

    The first line of every results file reads ``Title (date, machine...): what; `command` ``.
    """
    match = _HEADER.match(line.strip())
    if match is None:
        return {"title": "", "date": "", "setting": "", "description": line.strip(), "command": ""}
    meta = match["meta"]
    date = _DATE.search(meta)
    setting = meta[date.end() :].lstrip(", ") if date else meta
    rest = match["rest"]
    commands = _COMMAND.findall(rest)
    command = commands[-1] if commands else ""
    description = rest
    if command:
        description = rest[: rest.rfind(f"`{command}`")].rstrip("; ")
    return {
        "title": match["title"].strip(),
        "date": date.group(1) if date else "",
        "setting": setting,
        "description": description,
        "command": command,
    }


def result_fragment(stem: str) -> str:
    """The Markdown shown for ``results/<stem>.md`` (headings shifted below the page's)."""
    lines = (RESULTS / f"{stem}.md").read_text().splitlines()
    head = split_header(lines[0])
    out = [f"## `results/{stem}.md`", ""]
    if head["title"]:
        out += [f"**{head['title']}.** {head['description']}", ""]
    else:
        out += [head["description"], ""]
    out += [
        "```{list-table}",
        ":widths: 1 4",
        "",
        "* - Measured",
        f"  - {head['date'] or 'not recorded'}",
        "* - Where",
        f"  - {head['setting'] or 'not recorded'}",
        "```",
        "",
    ]
    if head["command"]:
        out += ["```bash", head["command"], "```", ""]
    png = RESULTS / f"{stem}.png"
    if png.exists():
        out += [f"```{{image}} /_generated/results/{stem}.png", f":alt: {stem}", "```", ""]
    for line in lines[1:]:
        if line.startswith("#"):
            line = "#" + line  # "## x" -> "### x": below the fragment's own heading
        out.append(line)
    return "\n".join(out).rstrip() + "\n"


def write_results() -> None:
    """Writes one fragment per results file; fails when a results file has no page."""
    claimed = {stem for stems in RESULT_PAGES.values() for stem in stems}
    present = {p.stem for p in RESULTS.glob("*.md")}
    missing = sorted(present - claimed)
    if missing:
        raise RuntimeError(
            f"results files not shown on any docs page: {missing}; add them to RESULT_PAGES in "
            "docs/_ext/revjax_docs.py"
        )
    gone = sorted(claimed - present)
    if gone:
        raise RuntimeError(f"RESULT_PAGES names results files that do not exist: {gone}")
    out = GENERATED / "results"
    out.mkdir(parents=True, exist_ok=True)
    for stem in sorted(present):
        _write_if_changed(out / f"{stem}.md", result_fragment(stem))
        png = RESULTS / f"{stem}.png"
        if png.exists():
            shutil.copyfile(png, out / png.name)


def _attributes(doc: str) -> dict[str, str]:
    """The ``name: text`` entries of a Google-style docstring from ``Attributes:`` on.

    Entries are indented one level below their section heading; their continuation lines more.
    A line at the heading's level (``Attributes:`` or a sub-heading) ends the current entry.
    """
    entries: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        first = lines.index("Attributes:")
    except ValueError:
        return entries
    current, entry_indent = None, 0
    for line in lines[first + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        match = re.match(r"^(\w+): (.*)$", line.strip())
        if indent == 0:
            current = None
        elif match and (current is None or indent <= entry_indent):
            current, entry_indent = match[1], indent
            entries[current] = match[2]
        elif current is not None:
            entries[current] += " " + line.strip()
    return entries


def config_table() -> str:
    """A Markdown table of every `TrainConfig` field: name, type, default, meaning."""
    from revjax.train import TrainConfig

    meanings = _attributes(TrainConfig.__doc__ or "")
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    missing = []
    for field in dataclasses.fields(TrainConfig):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        meaning = meanings.get(field.name)
        if meaning is None:
            missing.append(field.name)
            meaning = ""
        kind = str(field.type).replace("|", "\\|")
        rows.append(
            f"| `{field.name}` | `{kind}` | `{default}` | {meaning.replace('|', chr(92) + '|')} |"
        )
    if missing:
        raise RuntimeError(
            f"TrainConfig fields without an entry in its docstring's Attributes: {missing}"
        )
    return "\n".join(rows) + "\n"


def copy_notebooks() -> None:
    """Copies the notebooks into the docs tree (MyST-NB renders them with stored outputs)."""
    out = DOCS / "notebooks"
    out.mkdir(exist_ok=True)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        target = out / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)


def _write_if_changed(path: Path, text: str) -> None:
    # Rewriting an unchanged file would make Sphinx rebuild every page that includes it.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate() -> None:
    """Writes every generated file (also callable without Sphinx, e.g. from a test)."""
    GENERATED.mkdir(exist_ok=True)
    write_results()
    _write_if_changed(GENERATED / "train_config_fields.md", config_table())
    from experiments.configs import paper

    _write_if_changed(GENERATED / "paper_configs.md", paper.markdown_table())
    copy_notebooks()


def _on_config_inited(app, config) -> None:
    generate()


def _class_signature(app, what, name, obj, options, signature, return_annotation):
    """Fixes two class signatures autodoc gets wrong.

    - NNX modules: their metaclass's ``__call__`` hides ``__init__``, so autodoc shows
      ``(*args, **kwargs)``; show ``__init__``'s parameters instead.
    - Dataclasses: a field's ``default_factory()`` value instead of ``<factory>``, which is not
      Python, so Sphinx could not parse the signature and would split it at every comma
      (``tuple[int, ...]`` becoming two parameters).
    """
    if what != "class" or not signature:
        return None
    if signature.startswith("(*args") and "__init__" in vars(obj):
        from sphinx.util.inspect import signature as sphinx_signature
        from sphinx.util.inspect import stringify_signature

        init = sphinx_signature(obj.__init__, bound_method=True)  # without self
        text = stringify_signature(init, show_return_annotation=False, unqualified_typehints=True)
        return text, None
    if "<factory>" not in signature:
        return None
    factories = {
        f.name: f.default_factory
        for f in dataclasses.fields(obj)
        if f.default_factory is not dataclasses.MISSING
    }

    def value(match):
        return f"{match[1]}{match[2]}= {factories[match[1]]()!r}"

    signature = re.sub(r"(\w+)(: [^=]*?)?= <factory>", value, signature)
    return signature, return_annotation


def setup(app):
    app.connect("config-inited", _on_config_inited)
    app.connect("autodoc-process-signature", _class_signature)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
