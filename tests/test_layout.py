"""The layout of the package, counted from the code with ``ast``.

The parts are folders (at least three subpackages, at most 15 modules directly
in ``amiworker/``), no module grows past 600 lines, and no two modules import
each other, directly or around a loop. Imports inside functions count (moving
an import into a function hides a cycle, it does not remove it); imports under
``if TYPE_CHECKING:`` do not (they never run). A package's ``__init__`` that
re-exports its own submodules is its face, not a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "amiworker"
MAX_LINES = 600
MAX_TOP_LEVEL = 15


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", "")
            if name == "TYPE_CHECKING":
                for statement in node.body:
                    skipped.update(id(sub) for sub in ast.walk(statement))
    return skipped


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            if is_package and target.startswith(name + "."):
                continue  # a package's face re-exporting its own modules
            found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_parts_are_folders() -> None:
    known = modules()
    top_level = [p for p in known.values() if p.parent == PACKAGE and p.name != "__init__.py"]
    subpackages = {p.parent for p in known.values() if p.parent != PACKAGE}
    assert len(subpackages) >= 3, sorted(str(p) for p in subpackages)
    assert len(top_level) <= MAX_TOP_LEVEL, sorted(p.name for p in top_level)


def test_no_module_is_a_giant() -> None:
    sizes = {name: path.read_text().count("\n") for name, path in modules().items()}
    too_big = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert not too_big


def test_no_import_cycle() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_ami_client_stands_alone() -> None:
    """``amiworker.ami`` is usable on its own: it imports nothing else of amiworker
    (but the shared backoff and logging modules)."""
    known = modules()
    allowed = {"amiworker.backoff", "amiworker.logs"}
    for name, path in known.items():
        if name.startswith("amiworker.ami"):
            outside = {
                dep
                for dep in imports_of(name, path, known)
                if not dep.startswith("amiworker.ami") and dep not in allowed
            }
            assert not outside, (name, outside)
