"""The package's imports go one way: core <- methods <- api <- compose / interop <- train <- auto <- cli / serve.

Read from the source (no imports executed): every ``from deltatune...``/relative import, at module level or
inside a function, is an edge. The checks: no edge points to a higher layer, the module graph has no cycle,
and imports deferred into functions are only the CLI's lazy loading of its subcommands (a deferred import
elsewhere usually dodges a cycle). ``make lint`` runs this file, so the layering cannot quietly come back.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deltatune"
# Lower layers never import higher ones. compose and interop share a layer but stay independent of each other;
# so do cli and serve (the HTTP server, deltatune/serve/), except the CLI's lazy import of it.
LAYERS = {"core": 0, "methods": 1, "api": 2, "inspect": 2, "compose": 3, "interop": 3, "train": 4, "auto": 5,
          "cli": 6, "serve": 6, "data": 6, "__init__": 7}
DEFERRED_ALLOWED = {"deltatune.cli"}  # typer subcommands load the training stack only when run: fast --help


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def area(module: str) -> str:
    """``deltatune.methods.lora.layers`` -> ``methods``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(module: str) -> int:
    return LAYERS[area(module)]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported deltatune module, deferred?) for every import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" for a in node.names]  # a submodule, or a name in ``target``
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(t, id(node) not in top) for t in targets if t == "deltatune" or t.startswith("deltatune.")]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(target: str) -> str:  # the longest prefix that is a module: ``...lora.LoRA`` -> ``...lora``
        while target not in modules:
            target = target.rpartition(".")[0]
        return target

    return {name: [(resolve(t), d) for t, d in imports(path)] for name, path in modules.items()}


def test_no_import_points_up_a_layer():
    upward = [f"{src} -> {dst}" for src, edges in graph().items() for dst, _ in edges
              if layer_of(dst) > layer_of(src)]
    assert not upward, "imports against the layering (core <- methods <- api <- compose/interop <- train <- auto " \
                       f"<- cli / serve): {upward}"


def test_compose_and_interop_are_independent():
    crossed = [f"{s} -> {d}" for s, edges in graph().items() for d, _ in edges
               if {area(s), area(d)} == {"compose", "interop"}]
    assert not crossed, crossed


def test_the_library_never_imports_the_server():
    """serve sits beside the CLI: only the CLI (lazily, in ``deltatune serve``) may import it."""
    importers = sorted({src for src, edges in graph().items() for dst, _ in edges
                        if area(dst) == "serve" and area(src) not in ("serve", "cli")})
    assert not importers, f"modules importing deltatune.serve (only the CLI may): {importers}"


def test_no_import_cycles():
    edges = {src: {dst for dst, _ in out if dst != src} for src, out in graph().items()}
    cycles = strongly_connected(edges)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_are_deferred_only_where_startup_needs_it():
    deferred = sorted({f"{src} -> {dst}" for src, edges in graph().items() for dst, d in edges
                       if d and src not in DEFERRED_ALLOWED})
    assert not deferred, f"imports inside functions (move them to the top; fix the layering if they dodge a cycle): " \
                         f"{deferred}"


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found
