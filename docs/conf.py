"""Sphinx configuration of the revjax documentation (MyST Markdown + MyST-NB notebooks).

Build: ``make docs`` (offline; warnings are errors). The build never executes notebooks and
never reaches the network: the notebooks are rendered with their stored outputs, and there is
no intersphinx inventory to download.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # this checkout's revjax and experiments
sys.path.insert(0, str(DOCS / "_ext"))

import revjax  # noqa: E402

project = "revjax"
author = "The revjax authors"
copyright = "The revjax authors"  # noqa: A001
release = revjax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "sphinx_design",
    "revjax_docs",
]

# .rst first: autosummary writes its stub pages (reST) with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "_generated/**", "**.ipynb_checkpoints"]

# MyST: `$x$` maths, ::: fences, heading anchors for [text](page.md#anchor) links.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 4
# Notebooks are rendered as committed; the test suite executes them (tests/test_notebooks.py).
nb_execution_mode = "off"
# The stored stderr is the run's environment (library warnings naming its paths, progress bars);
# the pages show what the notebooks print and plot. Colab shows the stored notebook unfiltered.
nb_output_stderr = "remove"
# Markdown outputs (the benchmarks' tables) are GitHub-flavoured: CommonMark has no tables.
nb_render_markdown_format = "gfm"

# One code markup in docstrings: `x` is inline code (Google style, read by napoleon).
default_role = "code"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # types are in the signature
# Attributes as fields of their class (a NamedTuple instance such as revjax.additive_coupling
# shows its class docstring; separate attribute entries would be indexed twice).
napoleon_use_ivar = True
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = False
autodoc_class_signature = "mixed"
templates_path = ["_templates"]

# Every cross-reference inside revjax must resolve. Types of other libraries have no
# inventory in an offline build, so references to them are not checked.
nitpicky = True
_EXTERNAL = [
    r"(jax|jaxlib|flax|optax|numpy|np|jnp|nnx|chex|grain|orbax|tfds|tensorflow_datasets)(\..*)?",
    r"(collections|typing|types|os|pathlib|abc|dataclasses|enum|logging|signal|threading)\..*",
    r"(Any|Callable|Iterator|Iterable|Mapping|Sequence|PathLike|Path|NamedTuple)",
    r"(Array|PRNGKeyArray|ArrayLike|PyTree|Shape|DType|Mesh|NamedSharding|Sharding)",
    r"(GraphDef|State)",
    r"(int|float|str|bool|bytes|dict|list|tuple|None|type|object|callable|optional)",
]
nitpick_ignore_regex = [(r"py:.*", pattern) for pattern in _EXTERNAL]

html_theme = "sphinx_book_theme"
html_title = f"revjax {release}"
html_theme_options = {
    "repository_url": "https://github.com/revjax/revjax",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path = []
suppress_warnings = []
