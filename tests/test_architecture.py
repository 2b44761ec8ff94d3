"""The shape of the code, checked: no import cycles, no private names across modules, small core modules,
and no method-name branching outside the method registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tuneforge"
CORE = ("training", "data", "models", "objectives")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import that runs — module level and inside functions, not ``if TYPE_CHECKING:`` — as (module, names,
    line)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    """tuneforge module → the tuneforge modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for module, names, _ in imports_of(path):
            if not module.startswith("tuneforge"):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
            edges[name].update(t for t in targets if t in MODULES and t != name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_even_through_function_local_imports() -> None:
    edges = graph()
    assert edges["tuneforge.training.build"], "the graph sees imports"
    assert cycles(edges) == []


def test_no_private_names_imported_across_modules() -> None:
    bad = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line}: {module}.{n}"
        for m, path in MODULES.items()
        for module, names, line in imports_of(path)
        if module.startswith("tuneforge")
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert bad == []


@pytest.mark.parametrize("package", CORE)
def test_core_modules_stay_small(package: str) -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / package).glob("*.py")}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}


def test_only_the_registry_branches_on_method_names() -> None:
    """``recipe.method == "dpo"`` and friends live in methods.py; everything else asks the registry."""
    pattern = re.compile(r"\.method\s*(==|!=|in\b|not in\b)|method\s*==\s*[\"']")
    bad = [
        f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}"
        for name, path in MODULES.items()
        if name != "tuneforge.methods"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert bad == []


def test_no_type_ignores_in_the_training_package() -> None:
    bad = [
        f"{p.name}:{i}"
        for p in (ROOT / "training").glob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "type: ignore" in line
    ]
    assert bad == []
