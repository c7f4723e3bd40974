"""The package's shape, kept by CI: no import cycles, small modules and functions, layers that do not leak."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "catalog_tagger"
MAX_MODULE_LINES = 450  # the aim is ~400; a module over this must be split
MAX_FUNCTION_LINES = 60  # enforced in tag/: the stages must read top to bottom
STRICT_FUNCTION_DIRS = ("tag",)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that runs: all of them but ``if TYPE_CHECKING:`` blocks (type-only imports are not cycles)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every catalog_tagger module ``path`` imports, at module level or inside functions (lazy imports too)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                head = parts[: len(parts) - node.level + 1]
                base = ".".join([*head, base] if base else head)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "catalog_tagger":
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles (lazy imports count): " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_flows_or_bench() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py":
            continue  # the CLI is an edge: its `demo` command runs the flows (imported inside that command)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            bad = [m for m in mods if m.split(".")[0] in ("flows", "bench", "tests")]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the library must not depend on its edges"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size_and_docstring(path: Path) -> None:
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines (at most {MAX_MODULE_LINES}): split it by stage"
    if text.strip():
        assert ast.get_docstring(ast.parse(text)), f"{path.name}: a module opens with a one-line docstring of its role"


@pytest.mark.parametrize("sub", STRICT_FUNCTION_DIRS)
def test_stage_functions_are_short(sub: str) -> None:
    long = []
    for path in sorted((PACKAGE / sub).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_import_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a function-level import is an edge (the old train <-> train_ray cycle was one)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from catalog_tagger.train import loop\n")
    b = tmp_path / "b.py"
    b.write_text("from .kinds import kind_of\nif TYPE_CHECKING:\n    from catalog_tagger.x import y\n")
    known = {"catalog_tagger.train.loop", "catalog_tagger.kinds", "catalog_tagger.x"}
    assert _imports(a, "catalog_tagger.a", known) == {"catalog_tagger.train.loop"}
    assert _imports(b, "catalog_tagger.x", known) == {"catalog_tagger.kinds"}
