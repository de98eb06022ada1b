"""Packaging lives in pyproject.toml; this file only adds the optional compiled build.

``BALANCER_COMPILE=1 pip install --no-build-isolation .`` (with mypy and setuptools already in the
environment, and a C compiler) compiles the modules of the request path with mypyc, from the same
typed Python sources. Without the variable the package is pure Python, as every other install.
``make native`` does it in ``.venv-native``; the README's "Compiled build" says what it gains.
"""

import os

from setuptools import setup

# The request path: what runs for every request, and nothing that only runs at start-up or on the
# admin port. Changing the list changes what the compiled test pass covers (`make test`).
COMPILED = [
    # balancer/dataplane/: everything that runs per request on the data port.
    "balancer/dataplane/affinity.py",
    "balancer/dataplane/connections.py",
    "balancer/dataplane/deadlines.py",
    "balancer/dataplane/faults.py",
    "balancer/dataplane/frontdoor.py",
    "balancer/dataplane/guards.py",
    "balancer/dataplane/headers.py",
    "balancer/dataplane/listener.py",
    "balancer/dataplane/proxy.py",
    "balancer/dataplane/record.py",
    "balancer/dataplane/routing.py",
    "balancer/dataplane/throttledlog.py",
    "balancer/dataplane/tls.py",
    "balancer/dataplane/tunnel.py",
    "balancer/dataplane/upstream.py",
    # balancer/lb/: the parts of balancing policy each request consults or tells.
    "balancer/lb/hashing.py",
    "balancer/lb/passive.py",
    "balancer/lb/registry.py",
    "balancer/lb/selection.py",
    # balancer/observe/: told every finished request.
    "balancer/observe/accesslog.py",
    "balancer/observe/metrics.py",
    "balancer/observe/slowlog.py",
    "balancer/observe/stats.py",
    "balancer/observe/units.py",
]

ext_modules = []
if os.environ.get("BALANCER_COMPILE") == "1":
    from mypyc.build import mypycify

    # group_name puts mypyc's shared runtime library inside the package (balancer/_compiled__mypyc)
    # instead of a top-level module of a hashed name.
    ext_modules = mypycify(COMPILED, opt_level="3", group_name="balancer._compiled")

setup(ext_modules=ext_modules)
