"""The package's shape, read from the source with `ast` (nothing is imported): no import circle
inside `revjax/`, and every package and public module re-exports exactly its `__all__`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "revjax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The `revjax` modules ``name`` imports anywhere in its file (top level, inside functions,
    under ``TYPE_CHECKING``): ``from revjax.a import b`` counts as importing ``revjax.a.b`` when
    that is a module, else ``revjax.a``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    found = {m for m in found if m in MODULES}
    # A package importing its own children is how a package gathers its names: not a circle.
    return {m for m in found if m != name and not m.startswith(name + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_inside_revjax():
    graph = {name: _imports(name) for name in MODULES}
    assert graph["revjax.train.loop"] >= {"revjax.train.config", "revjax.train.resilience"}
    cycles = _cycles(graph)
    assert not cycles, f"modules importing each other (directly or through others): {cycles}"


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_train_config_is_a_leaf_of_the_trainer():
    inside = {m for m in _imports("revjax.train.config") if m.startswith("revjax.train")}
    assert not inside, f"revjax.train.config imports {sorted(inside)}"


def test_the_imagenet_input_does_not_know_dali():
    assert "revjax.data.dali_pipeline" not in _imports("revjax.data.imagenet")


def _exports(name: str) -> tuple[set[str], set[str], list[str] | None]:
    """(names re-exported as ``from x import Name as Name``, names defined at top level,
    ``__all__``) of one module."""
    tree = ast.parse(MODULES[name].read_text())
    reexported, defined, all_names = set(), set(), None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            reexported.update(a.name for a in node.names if a.asname == a.name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    if target.id == "__all__":
                        all_names = ast.literal_eval(node.value)
                    else:
                        defined.add(target.id)
    return reexported, defined, all_names


PUBLIC = sorted(
    n for n in MODULES if not any(part.startswith("_") for part in n.split("."))
)


@pytest.mark.parametrize("name", PUBLIC)
def test_reexports_equal_all(name):
    reexported, defined, all_names = _exports(name)
    if all_names is None:
        assert not reexported, f"{name} re-exports {sorted(reexported)} without an __all__"
        return
    assert len(all_names) == len(set(all_names)), f"{name}.__all__ lists a name twice"
    unlisted = sorted(reexported - set(all_names))
    assert not unlisted, f"{name} re-exports names missing from its __all__: {unlisted}"
    missing = sorted(set(all_names) - reexported - defined)
    assert not missing, f"{name}.__all__ lists names it neither defines nor re-exports: {missing}"


def test_the_config_names_match_the_trainer_tables():
    from revjax.train import config, optim

    assert list(optim.OPTIMIZERS) == list(config.OPTIMIZER_NAMES)
    assert list(optim.LR_SCHEDULES) == list(config.LR_SCHEDULE_NAMES)
    assert list(optim.WARMUP_OFFSETS) == list(config.WARMUP_STARTS)
