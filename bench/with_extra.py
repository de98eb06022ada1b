"""Run balancer on the harness's generated config with extra top-level YAML merged in.

The harness appends --config-extra to every target's config; this wrapper does it for one target
only (so one run can compare balancer with and without the access log and metrics).
Usage: .venv/bin/python bench/with_extra.py EXTRA.yaml CONFIG.yaml (or .venv-native/bin/python)
"""

import os
import sys
import tempfile

extra, config = sys.argv[1], sys.argv[2]
with open(config) as f, open(extra) as g:
    text = f.read() + "\n" + g.read()
fd, path = tempfile.mkstemp(suffix=".yaml")
with os.fdopen(fd, "w") as out:
    out.write(text)
# The balancer of the environment this runs in: .venv (interpreted) or .venv-native (compiled).
os.execv(os.path.join(os.path.dirname(sys.executable), "balancer"), ["balancer", "run", "-c", path])
