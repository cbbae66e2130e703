"""The suite's imports go one way: each package builds only on the layers below it, and no module imports itself
through others. Every import counts, those inside functions too; only ``if TYPE_CHECKING:`` blocks (annotations,
never run) do not."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = (
    ("foundation",),  # the case model and the error model
    ("subjects",),  # the subject side: MLX's layers, their conventions, MLX's kernels
    ("reference",),  # the reference side: peft and the float64 oracle
    ("reports",),  # the report and the regression table: they read results and run nothing (the plugin writes them)
    ("conformance",),  # the checks, the families, the plugin and the test modules
    ("catalogue",),  # the correct and wrong layers tests and studies run as subjects
    ("gate", "studies"),
    ("tests",),
)
"""The project's packages from the bottom up."""

LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imported(tree: ast.AST) -> set[str]:
    """The project's modules (or packages) a module imports, outside ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            found |= _imported(ast.Module(body=node.orelse, type_ignores=[]))
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        found |= _imported(node)
    return {name for name in found if name.split(".")[0] in LAYER_OF}


def import_graph() -> dict[str, set[str]]:
    """Each of the project's modules and the project's modules it imports."""
    paths = [path for package in LAYER_OF for path in (ROOT / package).rglob("*.py")]
    modules = {_module_name(path): path for path in paths}

    def resolve(name: str) -> str:  # `from package import name` names a module or something in the package
        found = name
        while found and found not in modules:
            found = found.rpartition(".")[0]
        return found or name.split(".")[0]

    return {
        module: {resolve(name) for name in _imported(ast.parse(path.read_text()))} - {module}
        for module, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported) :] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_module_imports_itself_through_others():
    cycle = _cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_each_package_imports_only_the_layers_below_it():
    def package(module: str) -> str:
        return module.split(".")[0]

    upward = sorted(
        f"{module} imports {imported}"
        for module, imports in import_graph().items()
        for imported in imports
        if package(imported) != package(module) and LAYER_OF[package(imported)] >= LAYER_OF[package(module)]
    )
    assert not upward, "imports against the layers (tests/meta_tests/test_imports.py: LAYERS):\n" + "\n".join(upward)


def test_every_package_of_the_project_has_a_layer():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages == set(LAYER_OF), f"packages={sorted(packages)}, but LAYERS names {sorted(LAYER_OF)}"


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import reference.oracle\n"
        "def f():\n    from conformance import checks\n"
    )
    assert _imported(tree) == {"conformance", "conformance.checks"}
