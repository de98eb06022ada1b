"""The build under test is the one `make test` meant to test.

`make test` runs the suite twice: on the sources, then on the compiled build of `.venv-native` with
BALANCER_EXPECT_COMPILED=1. Without this check a path slip (the sources shadowing the installed
package) would run the second pass interpreted and prove nothing.
"""

import ast
import importlib
import os
import sys
from pathlib import Path

import pytest

import balancer
from balancer.dataplane import compiled

ROOT = Path(__file__).resolve().parent.parent
EXPECT_COMPILED = os.environ.get("BALANCER_EXPECT_COMPILED") == "1"


def compiled_list() -> list[str]:
    # setup.py's COMPILED, parsed rather than imported: importing setup.py would run setup().
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMPILED"
                                                for t in node.targets):
            paths: list[str] = ast.literal_eval(node.value)
            return [str(Path(path).with_suffix("")).replace("/", ".") for path in paths]
    raise AssertionError("setup.py has no COMPILED list")


def test_the_build_under_test_is_the_expected_one() -> None:
    assert compiled() is EXPECT_COMPILED


@pytest.mark.parametrize("name", compiled_list())
def test_each_request_path_module_is_compiled_or_not_as_expected(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert module.__file__.endswith(".py") is not EXPECT_COMPILED, module.__file__


def test_balancer_is_imported_from_the_sources_only_in_the_interpreted_pass() -> None:
    from_sources = Path(balancer.__file__).resolve().parent == ROOT / "balancer"
    assert from_sources is not EXPECT_COMPILED, (balancer.__file__, sys.path[:3])
