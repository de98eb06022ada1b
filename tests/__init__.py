"""The test suite. `make test` runs it on the sources, then on the compiled build (see test_compiled.py).

pytest puts the repository's root first on sys.path (this directory is a package), so `import
balancer` would find the sources. In the compiled pass, balancer and backends are imported here with
the root moved to the end of the path, so they come from the installed build; later imports of their
modules follow the packages' own paths, whatever pytest puts on sys.path afterwards.
"""

import importlib
import os
import sys
from pathlib import Path

if os.environ.get("BALANCER_EXPECT_COMPILED") == "1":
    _root = str(Path(__file__).resolve().parent.parent)
    _saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in ("", _root)]
    importlib.import_module("balancer")
    importlib.import_module("backends")
    sys.path[:] = _saved
