"""The package's shape: folders on floors that import one way, no import cycles, no private names
across modules (ours or aiohttp's), and the data plane folder compiled whole."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_compiled import compiled_list

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "balancer").rglob("*.py"))
# Each part of balancer/ on its floor: a module imports from its own floor or a lower one, never a
# higher one (the README's "Layout" draws it).
FLOORS = {
    "errors": 0, "config": 0, "version": 0,     # words, settings, what we are
    "lb": 1,                        # balancing policy: backends, selection, health, spawned workers
    "dataplane": 2,                 # the request path
    "observe": 3,                   # what finished requests and the parts' state are told to
    "control": 4,                   # assembles the parts: start-up, reload, admin, proxy replicas
    "ctl": 5, "cli": 5, "__main__": 6, "__init__": 6,
}
# aiohttp modules and names that are its internals even without a leading underscore: the server
# protocol the old front door forked.
AIOHTTP_INTERNALS = {"web_protocol", "RequestHandler", "http_writer", "helpers", "streams"}


def aiohttp_private_uses(source: str) -> list[str]:
    """Every import of a private aiohttp module or name in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "aiohttp":
            parts = node.module.split(".")[1:]
            names = [alias.name for alias in node.names]
            for part in [*parts, *names]:
                if part.startswith("_") or part in AIOHTTP_INTERNALS:
                    found.append(f"from {node.module} import {', '.join(names)}")
                    break
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "aiohttp" and any(p.startswith("_") or p in AIOHTTP_INTERNALS
                                                 for p in parts[1:]):
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in ("aiohttp", "web") and node.attr.startswith("_"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_checker_sees_private_names() -> None:
    """The checker itself: each way of reaching aiohttp's internals is caught, public use is not."""
    assert aiohttp_private_uses("from aiohttp.web_protocol import RequestHandler")
    assert aiohttp_private_uses("from aiohttp.web_protocol import _ErrInfo")
    assert aiohttp_private_uses("from aiohttp import web_protocol")
    assert aiohttp_private_uses("import aiohttp._http_parser")
    assert aiohttp_private_uses("import aiohttp\naiohttp._x")
    assert not aiohttp_private_uses("from aiohttp import web\nimport aiohttp\nweb.Application()")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_aiohttp_names(path: Path) -> None:
    """balancer/ uses aiohttp's public API only: a private name ties us to one aiohttp release."""
    assert aiohttp_private_uses(path.read_text()) == []


def test_the_data_plane_is_imported_without_aiohttp() -> None:
    """Nothing under balancer/dataplane/ imports aiohttp: the request path is our own protocol."""
    for path in sorted((ROOT / "balancer" / "dataplane").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
            [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not any(m.split(".")[0] == "aiohttp" for m in modules), path


def test_every_data_plane_module_is_compiled() -> None:
    """The compiled build compiles the whole balancer/dataplane/ folder (setup.py's COMPILED)."""
    compiled = set(compiled_list())
    for path in (ROOT / "balancer" / "dataplane").glob("*.py"):
        if path.name != "__init__.py":
            assert f"balancer.dataplane.{path.stem}" in compiled, path


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import of a ``balancer`` module in ``source``, relative ones
    resolved, wherever it stands: at the top, in a function or under ``TYPE_CHECKING``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "balancer":
                found.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "balancer"]
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (``from . import x`` counts as importing ``x``)."""
    modules = {module_name(path): path for path in SOURCES}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for target, names in our_imports(name, path.read_text(), path.name == "__init__.py"):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            edges.update(submodules or [target])
        edges.discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floor_of(module: str) -> int:
    parts = module.split(".")
    return FLOORS[parts[1] if len(parts) > 1 else "__init__"]


def test_the_checkers_see_cycles_and_private_names() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert our_imports("balancer.control.admin", "if TYPE_CHECKING:\n    from .balancer import _x") == \
        [("balancer.control.balancer", ["_x"])]
    assert our_imports("balancer.lb", "from .. import errors", is_package=True) == [("balancer", ["errors"])]
    assert floor_of("balancer.dataplane.proxy") > floor_of("balancer.lb.registry")


def test_no_import_cycles() -> None:
    """Counting imports in functions and under TYPE_CHECKING: a cycle hidden from the interpreter is
    still two parts that cannot be understood one without the other."""
    graph = import_graph()
    assert len(graph) == len(SOURCES)
    assert cycles(graph) == []


def test_imports_go_down_the_floors() -> None:
    graph = import_graph()
    upward = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
              if floor_of(target) > floor_of(module)]
    assert upward == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_modules(path: Path) -> None:
    """A leading underscore means "this module's own": no other module imports it."""
    imports = our_imports(module_name(path), path.read_text(), path.name == "__init__.py")
    assert [(module, name) for module, names in imports for name in names if name.startswith("_")] == []
