"""The package's shape: no private aiohttp names, and the data plane folder compiled whole."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_compiled import _compiled_list

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "balancer").rglob("*.py"))
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
    compiled = set(_compiled_list())
    for path in (ROOT / "balancer" / "dataplane").glob("*.py"):
        if path.name != "__init__.py":
            assert f"balancer.dataplane.{path.stem}" in compiled, path
