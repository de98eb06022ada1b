"""Run balancer on the harness's generated config with extra top-level YAML merged in.

The harness appends --config-extra to every target's config; this wrapper does it for one target
only (so one run can compare balancer with and without the access log and metrics).
Usage: python bench/with_extra.py EXTRA.yaml CONFIG.yaml
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
here = os.path.dirname(os.path.abspath(__file__))
os.execv(os.path.join(here, "..", ".venv", "bin", "balancer"), ["balancer", "run", "-c", path])
