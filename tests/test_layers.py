"""The arrows point one way: no import cycle inside quartmail/, and the
library never imports the reference app (the layers are drawn in
quartmail/core.py).

Every import counts, wherever it is: at the top, in a function, under
``if TYPE_CHECKING:``. A cycle that only type checkers see is still two
modules that know each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import quartmail

PACKAGE = Path(quartmail.__file__).parent


def module_name(path: Path) -> str:
    parts = ["quartmail", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The quartmail modules that module *name* imports, anywhere in it."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            # from . import mime: the module quartmail.mime, not the package's __init__
            found.update(submodules or {base})
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imports(name) for name in MODULES}


def test_the_graph_is_read() -> None:
    # The test must see what it checks: known edges are found, the
    # TYPE_CHECKING one of the pytest plugin included.
    assert "quartmail.core" in GRAPH["quartmail.delivery"]
    assert "quartmail.mime" in GRAPH["quartmail.message"]
    assert "quartmail.testing" in GRAPH["quartmail.pytest_plugin"]
    assert "quartmail" in GRAPH["quartmail.app.email"]


def test_no_import_cycle_inside_quartmail() -> None:
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        path.append(name)
        for imported in sorted(GRAPH[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_the_library_never_imports_the_app() -> None:
    library = [name for name in GRAPH if not name.startswith("quartmail.app")]
    offenders = {
        name: sorted(
            m for m in GRAPH[name] if m == "quartmail.app" or m.startswith("quartmail.app.")
        )
        for name in library
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_nothing_below_the_front_imports_it() -> None:
    # The core and what sends through it never call back up into Mail.
    for name in (
        "quartmail.core",
        "quartmail.delivery",
        "quartmail.outbox",
        "quartmail.dispatcher",
    ):
        assert "quartmail.extension" not in GRAPH[name], name
        assert "quartmail" not in GRAPH[name], name
