"""Imports run one way, `schemas <- pipelines <- d2v_train <- flows`, pipelines and schemas never
import torch, and no package has a cycle of modules: read from the source, every import
(module level or inside a function) counted."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("schemas", "pipelines", "d2v_train", "flows")
TORCH_FREE = ("schemas", "pipelines")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of the file; `from m import n` counts
    `m.n` too where that is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, node.lineno))
            found += [(f"{module}.{a.name}", node.lineno) for a in node.names if f"{module}.{a.name}" in known]
    return found


def _violations(modules: dict[str, Path], root: Path = REPO) -> tuple[list[str], dict[str, set[str]]]:
    rank = {package: i for i, package in enumerate(PACKAGES)}
    wrong, edges = [], {}
    for name, path in modules.items():
        here = name.split(".")[0]
        for imported, line in _imports(name, path, modules):
            top = imported.split(".")[0]
            where = f"{path.relative_to(root)}:{line} imports {imported}"
            if top in rank and rank[top] > rank[here]:
                wrong.append(f"{where} ({here} may import only {', '.join(PACKAGES[:rank[here] + 1])})")
            if top == "torch" and here in TORCH_FREE:
                wrong.append(f"{where} ({here} must not need torch)")
            if imported in modules and imported != name and top == here:
                edges.setdefault(name, set()).add(imported)
    return wrong, edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(edges.get(module, ())):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return groups


def test_imports_run_one_way_and_no_package_has_a_cycle():
    modules = _modules()
    assert "d2v_train.trainer" in modules and "flows.cli" in modules, "the reader found the packages"
    wrong, edges = _violations(modules)
    assert not wrong, "imports against the direction schemas <- pipelines <- d2v_train <- flows:\n" + "\n".join(wrong)
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(group) for group in cycles)


def test_the_check_names_a_wrong_import_and_a_cycle(tmp_path):
    """The check itself: planted violations are named by file, line and import."""
    (tmp_path / "pipelines").mkdir()
    planted = tmp_path / "pipelines" / "planted.py"
    planted.write_text("import torch\n\n\ndef f():\n    from flows.cli import main\n")
    wrong, _ = _violations({"pipelines.planted": planted}, root=tmp_path)
    assert wrong == ["pipelines/planted.py:1 imports torch (pipelines must not need torch)",
                     "pipelines/planted.py:5 imports flows.cli (pipelines may import only schemas, pipelines)"]
    assert _cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]
