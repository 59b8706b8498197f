"""The package's modules import each other in one direction only: no import circles.

Read from the source with `ast` (nothing is imported), imports inside functions included: an
import deferred into a function still ties the two modules together (that is how the last
circle, translate -> alignment -> attention -> translate, hid).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "transformer_mt"


def module_imports(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, module names relative to the package
    ("search", "commands.translate"); the package's own __init__ is "__init__"."""
    name = package.name
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        modules[".".join(parts)] = path

    def resolve(dotted: str) -> str:
        """The module a dotted name inside the package (relative to it) refers to: the module
        itself, or the package or module that holds the name."""
        while dotted:
            if dotted in modules:
                return dotted
            if dotted + ".__init__" in modules:
                return dotted + ".__init__"
            dotted = dotted.rpartition(".")[0]
        return "__init__"

    def inside(full: str) -> str | None:
        """A dotted name relative to the package, or None for another package's."""
        if full == name:
            return ""
        return full[len(name) + 1:] if full.startswith(name + ".") else None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        here = module.split(".")[:-1]  # the module's own package, for relative imports
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [inside(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = inside(node.module or "")
                if base is None:
                    continue
                # `from X import a`: the module X.a where there is one, else X (a name defined in X)
                names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
                names = [n if resolve(n) in (n, n + ".__init__") else base for n in names]
            else:
                continue
            for dotted in names:
                if dotted is not None and resolve(dotted) != module:
                    targets.add(resolve(dotted))
        graph[module] = targets
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None: a depth-first search for an edge back to a
    module still on the path."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path)
                if found:
                    return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [])
            if found:
                return found
    return None


def test_no_import_circles():
    graph = module_imports(PACKAGE)
    assert {"search", "translate", "teacher_forcing"} <= set(graph)  # the package was read
    assert "search" in graph["translate"] and "teacher_forcing" in graph["search"]  # and its imports
    circle = find_circle(graph)
    assert circle is None, (
        "import circle: " + " -> ".join(circle) + ". Modules import in one direction only (docs/architecture.md): "
        "move what both need into a module below them, or pass it in as an argument.")


def test_a_circle_is_found_even_through_an_import_inside_a_function(tmp_path):
    package = tmp_path / "transformer_mt"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from transformer_mt.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("import numpy\nfrom transformer_mt.a import thing\n")
    (package / "d.py").write_text("import transformer_mt.c\n")
    graph = module_imports(package)
    assert graph["a"] == {"sub.b"} and graph["sub.b"] == {"c"} and graph["d"] == {"c"}
    assert find_circle(graph) == ["a", "sub.b", "c", "a"]
    (package / "c.py").write_text("import numpy\n")
    assert find_circle(module_imports(package)) is None


if __name__ == "__main__":  # python tests/test_imports.py: the graph, a module a line
    for module, targets in sorted(module_imports(PACKAGE).items()):
        print(module, "->", " ".join(sorted(targets)))
