"""The package's import graph: every ``kd`` import at module level, and no cycle among them.

An import inside a function hides a cycle (module A needs B, B needs A, so one of them imports
late): the hidden cycle then breaks whoever imports the two in the other order. This reads the
source (no import runs): each module's top-level ``kd`` imports are its edges, and the graph
must have no cycle; an import of a module of ``kd`` inside a function or class is refused.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from conftest import REPO

PACKAGE = REPO / "projects" / "kd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _kd_targets(node: ast.AST, modules: Set[str]) -> List[str]:
    """The modules of ``kd`` an import statement names (``from kd import x`` names ``kd.x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "kd"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module.split(".")[0] != "kd":
            return []
        named = [f"{node.module}.{a.name}" for a in node.names]
        subs = [n for n in named if n in modules]
        return subs if node.module == "kd" else [node.module, *subs]
    return []


def import_graph() -> Tuple[Dict[str, Set[str]], List[str]]:
    """(module -> the kd modules it imports at module level, imports found in functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph, nested = {}, []
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for stmt in tree.body:
            # Module level includes imports under `if` / `try` (optional dependencies).
            for node in ast.walk(stmt) if isinstance(stmt, (ast.If, ast.Try)) else [stmt]:
                edges.update(t for t in _kd_targets(node, modules) if t in modules)
        graph[name] = edges - {name}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for inner in ast.walk(node):
                    if _kd_targets(inner, modules):
                        nested.append(f"{path.relative_to(REPO)}:{inner.lineno}")
    return graph, sorted(set(nested))


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_and_a_nested_import():
    """On a graph written by hand: a -> b -> c -> a is one cycle, d on its own none."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from kd.config import load_config\n")
    assert _kd_targets(tree.body[0].body[0], {"kd.config"}) == ["kd.config"]
    assert _kd_targets(ast.parse("from kd import data").body[0], {"kd.data"}) == ["kd.data"]


def test_no_import_cycle_and_no_import_in_functions():
    graph, nested = import_graph()
    assert len(graph) > 40 and graph["kd.checkpoint"] >= {"kd.config", "kd.weights"}
    assert not nested, f"kd imports inside functions or classes: {nested}"
    assert not cycles(graph), f"import cycles: {cycles(graph)}"
