"""The tree's import rules, read from the source with `ast`: workflow code stays pure, every layer
imports only the layers beneath it, and no module imports itself back through others."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("genloop", "workflows", "persistence", "sandbox_host", "migrations", "activities", "api")
ROOF = "genloop.cli"
# Lower imports nothing above it; a package may import its own modules and anything of a lower rank.
RANK = {"genloop": 0, "workflows": 1, "persistence": 2, "sandbox_host": 2, "migrations": 3, "activities": 3, "api": 4,
        ROOF: 5}
# What deterministic workflow code may import besides the standard library and itself.
WORKFLOW_THIRD_PARTY = {"temporalio"}
WORKFLOW_PROJECT = {"genloop.errors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> set[str]:
    """Every module `module` imports (top-level names for libraries), TYPE_CHECKING blocks excepted."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import submodule` is an import of the submodule.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


IMPORTS = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> str:
    return ROOF if module == ROOF or module.startswith(ROOF + ".") else module.split(".")[0]


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def test_workflow_code_imports_no_io():
    offenders = []
    for module, imported in IMPORTS.items():
        if _layer(module) != "workflows":
            continue
        for name in imported:
            top = name.split(".")[0]
            allowed = (
                top in sys.stdlib_module_names
                or top in WORKFLOW_THIRD_PARTY
                or name in WORKFLOW_PROJECT
                or top == "workflows"
            )
            if not allowed:
                offenders.append(f"{module} imports {name}")
    assert not offenders, "workflow code must stay deterministic orchestration:\n" + "\n".join(offenders)


def test_layers_import_only_downwards():
    offenders = []
    for module, imported in IMPORTS.items():
        layer = _layer(module)
        for name in filter(_project, imported):
            target = _layer(name)
            if target != layer and RANK[target] >= RANK[layer]:
                offenders.append(f"{module} ({layer}) imports {name} ({target})")
    assert not offenders, "imports must point down the layers " + str(RANK) + ":\n" + "\n".join(offenders)


def test_no_import_cycles():
    graph = {m: {n for n in imported if n in MODULES and n != m} for m, imported in IMPORTS.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("rule", ["workflows", "floor", "cycle"])
def test_rules_catch_violations(rule, monkeypatch):
    """The checks above can fail: a planted bad import is reported."""
    if rule == "workflows":
        monkeypatch.setitem(IMPORTS, "workflows.build", IMPORTS["workflows.build"] | {"sqlalchemy"})
        with pytest.raises(AssertionError, match="workflows.build imports sqlalchemy"):
            test_workflow_code_imports_no_io()
    elif rule == "floor":
        monkeypatch.setitem(IMPORTS, "genloop.settings", IMPORTS["genloop.settings"] | {"genloop.cli.stack"})
        with pytest.raises(AssertionError, match="genloop.settings"):
            test_layers_import_only_downwards()
    else:
        monkeypatch.setitem(IMPORTS, "workflows.stages", IMPORTS["workflows.stages"] | {"workflows.build"})
        with pytest.raises(AssertionError, match="workflows.stages -> workflows.build -> workflows.stages"):
            test_no_import_cycles()
