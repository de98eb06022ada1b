#!/usr/bin/env python3
"""Overload: many concurrent client connections against four spawned workers (issue: reliability).

Starts balancer (this checkout's .venv) with four spawned workers, drives it with
``wrk -t1 -cN -dD`` (default 2000 connections for 10 s), samples balancer's RSS every 100 ms, and
prints requests, statuses (2xx vs other), socket errors, latency and peak RSS. Optional
``--max-connections`` sets limits.max_connections so the refusal path (clean 503) is exercised.

Usage: .venv/bin/python bench/overload.py [--connections 2000] [--duration 10] [--max-connections 0]
127.0.0.1 only; raises the open-files limit for itself and its children if it can.
"""

from __future__ import annotations

import argparse
import re
import resource
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from pool_reuse import ROOT, free_port, wait_ready  # type: ignore[import-not-found]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--max-connections", type=int, default=0)
    ap.add_argument("--path", default="/")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))
    port = free_port()
    config = (f"listen: {{host: 127.0.0.1, port: {port}}}\n"
              f"limits: {{max_connections: {args.max_connections}}}\n"
              "pools:\n  web:\n    spawn: {command: [python, -m, backends], count: 4}\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "balancer.yaml"
        path.write_text(config)
        proc = subprocess.Popen([str(ROOT / ".venv/bin/balancer"), "run", "-c", str(path)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(proc.pid))
                stop.wait(0.1)

        try:
            wait_ready(port, time.monotonic() + 30)
            idle_rss = rss_mib(proc.pid)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                                  "--timeout", "10s", "--latency", f"http://127.0.0.1:{port}{args.path}"],
                                 capture_output=True, text=True, check=True).stdout
            stop.set()
            sampler.join()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                still_serving = resp.status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: (.*)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s, limits.max_connections={args.max_connections}")
    print(f"requests        {requests}  ({requests / args.duration:.0f}/s)")
    print(f"non-2xx         {non2xx.group(1) if non2xx else 0}")
    print(f"socket errors   {sockets.group(1) if sockets else 'none'}")
    print(f"latency p99     {p99.group(1) if p99 else '?'}")
    print(f"RSS             idle {idle_rss:.1f} MiB, peak {peak[0]:.1f} MiB")
    print(f"serving after   {'yes' if still_serving else 'NO'}")


if __name__ == "__main__":
    main()
