"""The package's import graph: no cycles (function-local imports counted too), and entry points
that import the library, never each other."""

import ast
from pathlib import Path

import stitching

PACKAGE = Path(stitching.__file__).parent
#: the command-line modules: each a leaf that only the command line (and tests) import
ENTRY_POINTS = {"stitching.train", "stitching.grid", "stitching.similarity.__main__", "stitching.report",
                "stitching.probe", "stitching.grounding", "stitching.claims", "stitching.bench",
                "stitching.pretrain"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("stitching", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its file (module level or inside a function)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
                targets = [owner(f"{base}.{alias.name}") or owner(base) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [owner(alias.name) for alias in node.names]
            graph[name] |= {t for t in targets if t and t.startswith("stitching") and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_entry_points_import_the_library_never_each_other():
    graph = import_graph()
    assert ENTRY_POINTS <= set(graph)
    crossing = {(a, b) for a in ENTRY_POINTS for b in graph[a] if b in ENTRY_POINTS}
    assert not crossing, f"entry points importing entry points: {sorted(crossing)}"
    library = {a: graph[a] & ENTRY_POINTS for a in set(graph) - ENTRY_POINTS}
    assert not any(library.values()), {a: b for a, b in library.items() if b}
